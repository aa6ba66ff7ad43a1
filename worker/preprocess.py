"""A job's CPU work before the GPU: decode its images and run the model's processor, in processes of their own so
that this work never holds the GIL that the GPU thread needs between decode steps.

Why processes: the processor (Phi-3-vision's HD transform: PIL resizes, the crops' normalization, the tokenizer,
transformers' checks) is Python and numpy/torch work, much of it under the GIL. In the worker's one process every
millisecond of it is a millisecond in which the GPU thread may wait to launch its next step: the system reached
0.85x the decoder alone. A child process holds only its own GIL. What crosses: the image bytes going in (fetched
by the task thread, so that network, Redis, the SSRF guard and the key's access all stay in the worker, and the
headers checked there: bounds and the job's pixels before any decode) and the tensors coming back as numpy arrays
(a memcpy to unpickle, ~3.4 MB for one image at num_crops=4 in bf16). The same `Encoder` code runs inline and in a
child, so a job's tensors are the same either way.

`VISIONQ_PREPROCESS_PROCESSES` sizes the pool: `auto` is min(4, CPUs - 1) on CUDA and 0 on the CPU (there the GPU
thread is itself CPU work; more processes would take its cores), 0 runs everything in the task thread.

Lifetime: the pool starts with the worker (spawn: forking a process that holds CUDA and threads is unsafe) and is
warm before the worker says it is ready; `close` (Celery's worker_shutdown, after the warm shutdown has drained the
tasks) joins it. A child ignores SIGINT (a Ctrl-C reaches the whole terminal's group, and the warm shutdown still
needs it) and exits on its own within PARENT_CHECK_S of its parent's death: a SIGKILLed worker tells its children
nothing (each child holds both ends of the executor's call queue, so no pipe closes on it). A child that dies (a
decoder crash) breaks the executor: a new one replaces it and the jobs it had are sent once more; a job that
breaks the second one too fails as `image_unreadable`.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

import worker.models.phi3v  # noqa: F401  (registers the native Phi-3-vision port with the Auto classes)
from shared.config import Settings
from shared.errors import ImageUnreadable, NumCropsUnsupported
from shared.images.decode import configure_pillow, decode_image
from worker.decoding import Prompt
from worker.prompts import chat_messages, phi3_prompt

log = logging.getLogger(__name__)

# Checkpoints prompted with the Phi-3 cookbook string rather than a chat template.
PHI3_PROMPT_MODEL_TYPES = frozenset({"phi3_v"})
PARENT_CHECK_S = 0.5
# numpy has no bfloat16: such tensors travel as int16 of the same bits.
CARRIERS = {torch.bfloat16: torch.int16}


class Encoder:
    """The processor side of one model (no weights): its prompt format and its processor, in the model's dtype."""

    def __init__(self, model_id: str, trust_remote_code: bool, dtype: torch.dtype):
        self.model_id, self.dtype = model_id, dtype
        self.config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        # Phi-3-vision's processor (the port, worker/models/phi3v) takes a crop count per call.
        self.takes_num_crops = "num_crops" in inspect.signature(self.processor.__call__).parameters

    def prompt(self, n_images: int, question: str) -> str:
        """The prompt text: the Phi-3 cookbook string, or the same turn through the processor's chat template."""
        if self.config.model_type in PHI3_PROMPT_MODEL_TYPES or not getattr(self.processor, "chat_template", None):
            return phi3_prompt(n_images, question)
        return self.processor.apply_chat_template(
            chat_messages(n_images, question), add_generation_prompt=True, tokenize=False
        )

    def encode(self, images: list[Image.Image], question: str, num_crops: int | None) -> dict[str, torch.Tensor]:
        """The processor's tensors for one prompt, on the CPU. `num_crops` (None: the processor's own) is for
        Phi-3-vision's processor only."""
        options = {}
        if num_crops is not None:
            if not self.takes_num_crops:  # the API let it through: VISIONQ_NUM_CROPS_MODELS names this model
                raise NumCropsUnsupported(f"this worker's model ({self.model_id}) does not take num_crops")
            options["num_crops"] = num_crops
        encoded = self.processor(text=self.prompt(len(images), question), images=images, return_tensors="pt",
                                 **options)
        # Pixels in the model's dtype already: half the bytes for the GPU thread to batch and copy (same rounding).
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in encoded.items()}


def pool_size(setting: int | Literal["auto"], device: torch.device) -> int:
    """How many preprocessing processes: the setting, or for `auto` min(4, CPUs - 1) on CUDA and none on the CPU."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


class Preprocessor:
    """Turns a job's image bytes and question into its Prompt: in the calling thread (`processes` 0) or in a pool
    of processes that each load the processor only."""

    def __init__(self, settings: Settings, encoder: Encoder, processes: int):
        self.settings, self.encoder, self.processes = settings, encoder, processes
        self.lock = threading.Lock()
        self.alone = threading.Lock()  # held by the one job a pool's owner prepares `here` (see `prepare`)
        self.pids: list[int] = []  # the pool's processes, as they answered its warm-up
        self.pool: ProcessPoolExecutor | None = self._start() if processes else None

    def prepare(self, blobs: list[bytes], question: str, max_new_tokens: int, num_crops: int | None,
                here: bool = False) -> Prompt:
        """Decode (shared/images/decode.py, with its bounds) and encode; image errors keep their codes. In the
        calling thread without a pool, or when asked `here` while no other job is being prepared here that way
        (an idle GPU's lone job: the pool's round trip would be its latency); else in the pool."""
        if not self.processes:
            return self._here(blobs, question, max_new_tokens, num_crops)
        if here and self.alone.acquire(blocking=False):
            try:
                return self._here(blobs, question, max_new_tokens, num_crops)
            finally:
                self.alone.release()
        return Prompt(_unpack(self._in_pool(blobs, question, num_crops)), max_new_tokens)

    def _here(self, blobs: list[bytes], question: str, max_new_tokens: int, num_crops: int | None) -> Prompt:
        images = [decode_image(blob, self.settings) for blob in blobs]
        return Prompt(self.encoder.encode(images, question, num_crops), max_new_tokens)

    def close(self) -> None:
        """Join the pool's processes (once no job needs them: the worker's tasks have ended)."""
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _in_pool(self, blobs: list[bytes], question: str, num_crops: int | None) -> dict:
        for attempt in (1, 2):
            pool = self.pool
            if pool is None:
                raise RuntimeError("the preprocessing pool is closed (the worker is stopping)")
            try:
                return pool.submit(_child_encode, blobs, question, num_crops).result(self.settings.job_timeout_s)
            except BrokenProcessPool:
                log.warning("a preprocessing process died (attempt %d of this job); starting a new pool", attempt)
                self._replace(pool)
        raise ImageUnreadable("an image of the job crashed the image decoder")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self.lock:
            if self.pool is broken:  # the first of the jobs that saw it break replaces it
                self.pool = self._start()
        broken.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        """A pool whose every process is up, its processor loaded, before the first job: as many no-op submits as
        processes (each spawns one while none is idle), and every process says when its processor is loaded."""
        started = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        ready = context.Queue()
        pool = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_start_child,
                                   initargs=(self.settings, self.encoder.dtype, os.getpid(), ready))
        warm: list[Future] = [pool.submit(_child_ready) for _ in range(self.processes)]
        self.pids = sorted(ready.get(timeout=300) for _ in range(self.processes))
        for future in warm:
            future.result(timeout=300)
        ready.close()
        log.info("preprocessing pool: %d processes (%s) in %.1f s", len(self.pids), self.pids,
                 time.perf_counter() - started)
        return pool


# --- in a child process ---------------------------------------------------------------------------------------

_child: tuple[Settings, Encoder] | None = None


def _start_child(settings: Settings, dtype: torch.dtype, parent: int, ready) -> None:
    """A pool process: its processor loaded once, one intra-op thread (the pool is the parallelism), gone with its
    parent."""
    global _child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="visionq-parent-watch", daemon=True).start()
    torch.set_num_threads(1)
    configure_pillow(settings)
    _child = (settings, Encoder(settings.model, settings.trust_remote_code, dtype))
    ready.put(os.getpid())


def _exit_with_parent(parent: int) -> None:
    """Exit once the process that started this one is gone (it was SIGKILLed, or exited without closing us)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _child_ready() -> None:
    """The warm-up's no-op: its submit spawned a process."""


def _child_encode(blobs: list[bytes], question: str, num_crops: int | None) -> dict:
    settings, encoder = _child
    images = [decode_image(blob, settings) for blob in blobs]
    return _pack(encoder.encode(images, question, num_crops))


def _pack(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, np.ndarray]]:
    """Tensors as numpy arrays of the same bits: pickled by value (torch's own pickling in multiprocessing would
    move them through shared-memory file descriptors instead)."""
    return {name: (str(t.dtype).removeprefix("torch."), t.contiguous().view(CARRIERS.get(t.dtype, t.dtype)).numpy())
            for name, t in tensors.items()}


def _unpack(packed: dict[str, tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (dtype, array) in packed.items()}
