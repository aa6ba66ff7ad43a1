"""Processes that each run an Encoder (worker/encoder.py) on one job at a time, each over a socket of its own.

Why not `concurrent.futures.ProcessPoolExecutor`: its round trip is three thread hops in the worker (the caller, the
executor's manager thread, its call queue's feeder thread) and four copies of the result (pickled into bytes,
read in chunks, gathered, unpickled), each hop waiting for the GIL that the GPU thread and Celery's threads hold in
turn. On the H200 host a lone job's images took 44-45 ms through it against 24 ms prepared inline. Here the
calling task thread talks to an idle process itself: it sends the request, blocks in the socket's read (the GIL
released), and reads each tensor's bytes straight into a tensor of its own (`recv_into`), one copy from the
kernel. A process that dies (a decoder crash) loses the one job it had, not the pool's other jobs.

A process ignores SIGINT (a Ctrl-C reaches the terminal's whole group, and the warm shutdown still needs it) and
ends when its socket closes (`close`, or the worker's death: the worker holds the only other end) or, whatever
holds the socket, within PARENT_CHECK_S of its parent's death (a SIGKILLed worker tells it nothing), with
`os._exit`: nothing of an interpreter's shutdown (atexit handlers, threads a library started) can keep it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import torch

from shared.config import Settings
from shared.images.decode import configure_pillow
from worker.encoder import Encoder
from worker.lending import Lender, LenderClosed

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300  # spawning a process and loading its processor (transformers, the tokenizer)
PARENT_CHECK_S = 0.5


class ProcessDied(Exception):
    """The process ended while it had a job (a decoder crash, a kill)."""


class EncoderProcess:
    """One spawned process with its processor loaded, and the worker's end of its socket."""

    def __init__(self, settings: Settings, dtype: torch.dtype):
        context = multiprocessing.get_context("spawn")  # forking a process that holds CUDA and threads is unsafe
        ours, theirs = context.Pipe(duplex=True)  # a socket pair on POSIX
        self.process = context.Process(target=_serve, args=(theirs, settings, dtype), name="visionq-preprocess",
                                       daemon=True)
        self.process.start()
        theirs.close()  # the child's end lives in the child only: its death closes the socket
        self.connection = ours
        self.socket = socket.socket(fileno=os.dup(ours.fileno()))  # the same socket, for recv_into
        self.pid = self.process.pid

    def wait_ready(self) -> None:
        if not self.connection.poll(READY_TIMEOUT_S):
            self.kill()
            raise RuntimeError("a preprocessing process did not load its processor in time")
        self.connection.recv()

    def encode(self, blobs: list[bytes], question: str, num_crops: int | None,
               timeout_s: float) -> dict[str, torch.Tensor]:
        """The job's tensors, or the exception its encoding raised (image errors keep their codes); ProcessDied when
        the process ended; TimeoutError (the process is killed) when it took longer than `timeout_s`."""
        try:
            self.connection.send((blobs, question, num_crops))
            answered = self.connection.poll(timeout_s)
            if answered:
                outcome, detail = self.connection.recv()
                if outcome == "ok":
                    return {name: self._receive(dtype, shape) for name, dtype, shape in detail}
        except (EOFError, OSError) as exc:
            raise ProcessDied(f"preprocessing process {self.pid} ended ({type(exc).__name__})") from None
        if not answered:
            self.kill()
            raise TimeoutError(f"preprocessing took longer than {timeout_s:g} s")
        raise detail

    def _receive(self, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        _read_exactly(self.socket, _bytes_of(tensor))
        return tensor

    def close(self, timeout_s: float = 10) -> None:
        """Ask the process to end, and wait for it (killed past `timeout_s`)."""
        try:
            self.connection.send(None)
        except OSError:
            pass  # already gone
        self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()
        self.socket.close()


class EncoderPool:
    """`size` EncoderProcesses, each lent to one calling thread at a time, in the lanes' order of worker/lending.py
    (a burst's short jobs are not prepared after all of its long ones)."""

    def __init__(self, settings: Settings, dtype: torch.dtype, size: int,
                 on_respawn: Callable[[list[int]], None] = lambda pids: None):
        self.settings, self.dtype = settings, dtype
        self.on_respawn = on_respawn  # told the pool's pids after a process was replaced (the worker's record)
        self.idle: Lender[EncoderProcess] = Lender()  # closed with the pool
        self.lock = threading.Lock()  # `processes` against `close`
        started = time.perf_counter()
        self.processes = [EncoderProcess(settings, dtype) for _ in range(size)]  # spawned together, then waited
        for process in self.processes:
            process.wait_ready()
            self.idle.give(process)
        log.info("preprocessing pool: %d processes (%s) in %.1f s", size, self.pids, time.perf_counter() - started)

    @property
    def pids(self) -> list[int]:
        return sorted(process.pid for process in self.processes)

    def encode(self, blobs: list[bytes], question: str, num_crops: int | None,
               max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """The job's tensors from an idle process (`max_new_tokens`: the job's place in the short lane). A process
        that dies under the job is replaced and the job goes to another once; dying twice, it fails as
        ProcessDied."""
        for attempt in (1, 2):
            process = self._take(max_new_tokens)
            try:
                tensors = process.encode(blobs, question, num_crops, self.settings.job_timeout_s)
            except TimeoutError:
                self._replace(process)
                raise
            except ProcessDied:
                log.warning("preprocessing process %d died (attempt %d of this job); starting another", process.pid,
                            attempt)
                self._replace(process)
                if attempt == 2:
                    raise
                continue
            except BaseException:
                self.idle.give(process)
                raise
            self.idle.give(process)
            return tensors
        raise AssertionError("unreachable")

    def close(self) -> None:
        """End every process (once no job needs them: the worker's tasks have ended)."""
        with self.lock:
            self.idle.close()  # wakes any thread still waiting for a process: it fails
            processes = list(self.processes)
        for process in processes:
            process.close()

    def _take(self, max_new_tokens: int) -> EncoderProcess:
        try:
            return self.idle.take(max_new_tokens)
        except LenderClosed:
            raise RuntimeError("the preprocessing pool is closed (the worker is stopping)") from None

    def _replace(self, dead: EncoderProcess) -> None:
        dead.kill()
        fresh = EncoderProcess(self.settings, self.dtype)
        fresh.wait_ready()
        with self.lock:
            if self.idle.closed:
                fresh.close()
                return
            self.processes[self.processes.index(dead)] = fresh
        self.idle.give(fresh)
        try:
            self.on_respawn(self.pids)
        except Exception:  # the record is for operators: its failure must not fail the job
            log.warning("could not record the preprocessing pool's new processes", exc_info=True)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as a flat, writable byte view (numpy has no bfloat16: seen as uint8)."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else memoryview(b"")


def _read_exactly(sock: socket.socket, into: memoryview) -> None:
    while into:
        got = sock.recv_into(into)
        if not got:
            raise EOFError("the socket closed mid-tensor")
        into = into[got:]


# --- in a pool process ----------------------------------------------------------------------------------------

def _serve(connection, settings: Settings, dtype: torch.dtype) -> None:
    """A pool process: serve jobs until the socket closes or says None, then exit at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="visionq-parent-watch", daemon=True).start()
    try:
        _serve_jobs(connection, settings, dtype)
    finally:
        os._exit(0)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _serve_jobs(connection, settings: Settings, dtype: torch.dtype) -> None:
    """Load the processor once, then encode jobs. One intra-op thread: the pool is the parallelism."""
    torch.set_num_threads(1)
    configure_pillow(settings)
    encoder = Encoder(settings.model, settings.trust_remote_code, dtype)
    raw = socket.socket(fileno=os.dup(connection.fileno()))
    connection.send(os.getpid())
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if request is None:
            return
        blobs, question, num_crops = request
        try:
            tensors = {name: t.contiguous() for name, t in
                       encoder.encode_bytes(blobs, question, num_crops, settings).items()}
        except Exception as exc:  # the job's error, for its caller to raise (image errors keep their codes)
            _send_error(connection, exc)
            continue
        connection.send(("ok", [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                                for name, t in tensors.items()]))
        for tensor in tensors.values():
            raw.sendall(_bytes_of(tensor))


def _send_error(connection, exc: Exception) -> None:
    try:
        connection.send(("error", exc.with_traceback(None)))
    except Exception:  # an exception that does not pickle (pickling fails before anything is written)
        connection.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
