"""Iteration-level scheduling: task threads hand prepared prompts to one GPU thread, which decodes them in rows
that join and leave the running batch at every step.

Celery runs the worker with a threads pool of 2 x max_batch: each task thread fetches its job's images and has
them decoded and the processor run (worker/preprocess.py: CPU work that overlaps the GPU, in processes of its own
so that it does not hold this thread's GIL), then waits here for its own completion. The GPU thread loops: take in
the prompts waiting now, prefill some of them into free rows (in the lanes' order, below; at most `step_tokens`
prompt tokens a step, at least one prompt), run one decode step of every row, hand back the rows that ended (each
job's future resolves at once, and its row is free for the next prompt), and end the rows of canceled jobs (which
the store is asked every CANCEL_POLL_S, by a thread of its own). Prefill runs between decode steps, not inside
them: the decode step keeps its fixed shapes and its CUDA graph, and the prefill its batched forward; the cost is
a decode step that waits for the prefill before it. A mixed step (the prefill in the decode step's forward) would
save the step's weight read and launches, not its rows' keys and values, which bound it at many rows: modelled in
`bench/scheduling.py` (the step's fixed 2.9 ms saved whenever a prefill joins), +1.8% forced and +1.6% mixed
tokens/s, and no shorter wait for short jobs.

Why a small `step_tokens`, even when a burst arrives at an idle GPU: every running row waits for each prefill, and
the GPU's work per job is about the same whichever way the prefills and steps interleave (a decode step's cost
grows with its rows' keys and values; its fixed part is small), so joining a burst all at once only delays every
token of it (on the H200 a burst of 256 jobs at num_crops=4, ~770-token prompts, used to prefill for ~5 s
before its first decode step). Not too small either: a prefill forward of one or two prompts is bound by its
kernel launches (on the H200, 2 prompts took 19.9 ms each in the decoder's admit, against 15.8 ms each in chunks
of 5 and 15.5 ms in chunks of up to 21), so the default 4,096 tokens is five such prompts a step. Rows still fill up:
in a steady stream a step admits about as many jobs as end in a step. (`python -m bench.scheduling`: this class
against a decoder that sleeps the H200's measured costs, cap 256, 256 forced and 512 mixed jobs; step_tokens 1,024,
2,048, 4,096, 8,192, 16,384: forced 24.4, 28.3, 31.3, 32.5, 33.0 jobs/s; mixed jobs of <= 32 tokens p50 3.46,
3.11, 3.20, 5.06, 4.89 s.)

A run starts when the GPU thread is idle and a prompt arrives: it waits a little for a burst to gather (`wait_s`,
longer while task threads are still preparing: the lanes then choose among more prompts; not at all when no task
thread is preparing one, as for an idle worker's lone job), and lays the KV arena out: with blocks (the default),
in rows that may grow as long as the pool holds, so any later prompt joins once its blocks are free; without, in
rows long enough for every prompt waiting then, and a later prompt whose need is longer waits, with those behind
it, until the run's rows have ended, and starts the next run with longer rows. A message is acknowledged only when
its task returns, after the result is stored, so a worker killed mid-run leaves every unfinished job to be
redelivered.

Admission order, when more prompts wait than rows are free: two lanes take turns, one free row each. The short
lane admits the waiting job with the fewest max_new_tokens (ties: the earlier), the other the job that has waited
longest. A short job holds its row briefly, so letting it pass costs the others little and saves it a whole long
wait (shortest job first minimizes the mean wait); the oldest lane is the aging bound, and it keeps long jobs
starting all along, where shortest first alone would leave the longest jobs of a burst to start last, together,
and end the burst on a tail of few rows. A job waits for at most two admissions per job that arrived before it,
plus one: never forever, however many short jobs keep coming. (`bench/gpu_throughput.py --lengths 16:512` on the
CPU, tiny Phi-3-V, 96 jobs at 16 rows: the jobs of <= 32 tokens had a p50 latency of 0.57-0.72x the p50 of all
jobs, 0.89x first come first served; on 2 busy cores the jobs/s were too noisy to compare.)
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from worker.decoding import BatchStats, Completion, Decoder, Prompt

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.2


@dataclass(eq=False)  # hashed by identity: the decoder's rows carry tickets as their tags
class Ticket:
    """One job waiting for the GPU."""

    job_id: str
    prompt: Prompt
    future: Future = field(default_factory=Future)
    arrival: int = 0  # when it reached the GPU thread, in tickets
    announced: bool = False  # submitted from inside `Batcher.expect` (the worker's tasks always are)


class Batcher:
    """Owns the decoder; everything that touches the GPU happens on its one thread."""

    def __init__(self, decoder: Decoder, max_batch: int, wait_s: float, fill_wait_s: float = 0.0,
                 canceled: Callable[[list[str]], set[str]] = lambda ids: set(),
                 on_batch: Callable[[BatchStats], None] = lambda stats: None, short_lane: bool = True,
                 step_tokens: int = 4096):
        self.decoder, self.max_batch, self.wait_s = decoder, max_batch, wait_s
        self.step_tokens = step_tokens  # prompt tokens that join per step (the first prompt always does)
        self.short_lane = short_lane  # False: first come, first served
        self.short_turn = True  # whether the short lane takes the next free row
        self.arrivals = itertools.count()  # next() is atomic under the GIL: task threads number their tickets
        self.fill_wait_s = max(wait_s, fill_wait_s)
        self.canceled, self.on_batch = canceled, on_batch
        self.waiting: queue.Queue[Ticket] = queue.Queue()
        self.deferred: deque[Ticket] = deque()  # taken from the queue, not admitted yet: they go first
        self.preparing = 0  # task threads loading images for a ticket right now (see `expect`)
        self.announcing = threading.local()  # .active: this thread is in `expect` and has not submitted yet
        self.lock = threading.Lock()
        self.idle_since = time.monotonic()
        self.in_run = False  # from a run's first ticket until no row is left (see `idle`)
        self.last_cancel_poll = time.monotonic()
        # One question (the job ids to check) and one answer (the canceled ones) in flight at a time.
        self.cancel_asks: queue.Queue[list[str]] = queue.Queue(maxsize=1)
        self.cancel_answers: queue.Queue[set[str]] = queue.Queue(maxsize=1)
        threading.Thread(target=self._watch_cancels, name="visionq-cancels", daemon=True).start()
        self.thread = threading.Thread(target=self._loop, name="visionq-gpu", daemon=True)
        self.thread.start()

    @contextmanager
    def expect(self):
        """Held by a task thread while it prepares a ticket (and submits it, inside): an idle GPU thread that has a
        first ticket waits for such tickets (at most `fill_wait_s`), so a burst of jobs starts as one prefill rather
        than a trickle; and when every ticket so far was announced so and no thread is preparing one, it waits for
        nothing (see `_gather`)."""
        with self.lock:
            self.preparing += 1
        self.announcing.active = True
        try:
            yield
        finally:
            with self.lock:
                if self.announcing.active:  # not submitted (its job failed before the GPU)
                    self.preparing -= 1
            self.announcing.active = False

    def idle(self) -> bool:
        """Whether the GPU thread is between runs (no row decodes or prefills) and no ticket waits for it; read
        from task threads: a hint, not a promise."""
        return not self.in_run and self.waiting.empty()

    def submit(self, job_id: str, prompt: Prompt) -> Future:
        """Queue one prompt; the future gets its Completion (or the exception that ended its row)."""
        announced = getattr(self.announcing, "active", False)
        ticket = Ticket(job_id, prompt, arrival=next(self.arrivals), announced=announced)
        with self.lock:  # one change: the GPU thread sees this thread preparing, or its ticket, never neither or both
            if announced:
                self.preparing -= 1
                self.announcing.active = False
            self.waiting.put(ticket)
        return ticket.future

    def _loop(self) -> None:
        while True:
            first = self.deferred.popleft() if self.deferred else self.waiting.get()
            self.in_run = True
            idle_s = time.monotonic() - self.idle_since
            try:
                self._run(first, idle_s)
            except BaseException:  # the GPU thread must outlive any run
                log.exception("a run failed outside its jobs")
                for ticket in self.decoder.abort():
                    _fail(ticket, RuntimeError("the GPU thread's run failed"))
            self.idle_since = time.monotonic()
            self.in_run = False

    def _run(self, first: Ticket, idle_s: float) -> None:
        """From idle to idle: rows join while there are free rows and prompts that fit, and leave as they end."""
        self.deferred.appendleft(first)
        self._gather()
        self.decoder.plan(max(t.prompt.need for t in self.deferred), self.max_batch)
        layout = self.decoder.layout
        stats = BatchStats(0, layout.rows, layout.length, self.decoder.use_graphs, idle_s=idle_s)
        while True:
            self._pull()
            self._admit(stats)
            if self.decoder.running:
                self._step(stats)
            elif not self.deferred or not self.decoder.fits(self.deferred[0].prompt):
                break  # idle, or the next prompt needs longer rows: a new run lays them out
            self._poll_cancel()
        self.on_batch(stats)

    def _gather(self) -> None:
        """A burst: wait up to wait_s for more tickets (longer while task threads still prepare some)."""
        deadline, fill_deadline = time.monotonic() + self.wait_s, time.monotonic() + self.fill_wait_s
        while len(self.deferred) < self.max_batch:
            if self._nothing_coming():
                return
            try:
                self.deferred.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.preparing and time.monotonic() < fill_deadline:
                    deadline = min(time.monotonic() + 0.005, fill_deadline)
                    continue
                return

    def _nothing_coming(self) -> bool:
        """Every ticket here was announced and no task thread is preparing another: the worker's tasks submit only
        from inside `expect`, so none can come before a new job has fetched and prepared its images, and an idle
        worker's lone job need not wait `wait_s` for a burst that is not there (on the H200, 5-10 ms of its
        latency). Tickets submitted otherwise (tests, probes) keep the plain `wait_s`."""
        with self.lock:
            return not self.preparing and self.waiting.empty() and all(t.announced for t in self.deferred)

    def _pull(self) -> None:
        while True:
            try:
                self.deferred.append(self.waiting.get_nowait())
            except queue.Empty:
                return

    def _admit(self, stats: BatchStats) -> None:
        """Prefill waiting tickets into free rows, in the lanes' order, up to `step_tokens` prompt tokens (at least one
        ticket); a ticket that needs longer rows (or more blocks than are free) stops the admissions until the run
        ends (or blocks are freed)."""
        joining: list[Ticket] = []
        joining_prompts: list = []  # kept beside `joining`: fits() is asked once per candidate, on the GPU thread
        budget = self.step_tokens
        free = self.decoder.free_rows()
        if free and len(self.deferred) > 1:
            self._order()
        while self.deferred and len(joining) < free:
            ticket = self.deferred[0]
            if ticket.future.done():  # canceled while it waited
                self.deferred.popleft()
                continue
            if not self.decoder.fits(ticket.prompt, joining_prompts) or (joining and ticket.prompt.length > budget):
                break
            budget -= ticket.prompt.length
            joining.append(self.deferred.popleft())
            joining_prompts.append(ticket.prompt)
        if not joining:
            return
        self.short_turn ^= len(joining) % 2 == 1  # the lanes took turns over these rows
        started = time.perf_counter()
        self._prefill(joining)
        stats.rows += len(joining)
        stats.prefill_s += time.perf_counter() - started
        stats.peak_rows = max(stats.peak_rows, self.decoder.running)

    def _order(self) -> None:
        """The waiting tickets in admission order: the lanes' picks in turn, from the lane whose turn is next (the
        deque's other users see the order at its front, as before)."""
        by_arrival = sorted(self.deferred, key=lambda t: t.arrival)
        if not self.short_lane:
            self.deferred = deque(by_arrival)
            return
        by_length = sorted(by_arrival, key=lambda t: t.prompt.max_new_tokens)  # stable: ties stay by arrival
        lanes = [iter(by_length), iter(by_arrival)]
        turn, taken, order = 0 if self.short_turn else 1, set(), []
        while len(order) < len(by_arrival):
            ticket = next(t for t in lanes[turn] if id(t) not in taken)
            taken.add(id(ticket))
            order.append(ticket)
            turn ^= 1
        self.deferred = deque(order)

    def _prefill(self, joining: list[Ticket]) -> None:
        try:
            _resolve(self.decoder.admit([(t, t.prompt) for t in joining]))
            return
        except Exception as exc:
            failure = exc.with_traceback(None)  # its frames hold the prefill's GPU tensors: let them go
        admitted = {id(row.tag) for row in self.decoder.rows if row is not None}
        left = [t for t in joining if id(t) not in admitted and not t.future.done()]
        if isinstance(failure, torch.cuda.OutOfMemoryError):
            self.decoder.out_of_memory()
            self.deferred.extendleft(reversed(left))  # again, in smaller chunks
            return
        if len(left) == 1:
            _fail(left[0], failure)
            return
        # One bad prompt must not fail its neighbours: each alone, so that only the bad one fails.
        log.warning("a prefill of %d prompts failed (%s: %s); prefilling them one by one", len(left),
                    type(failure).__name__, failure)
        for ticket in left:
            self._prefill([ticket])

    def _step(self, stats: BatchStats) -> None:
        started = time.perf_counter()
        try:
            _resolve(self.decoder.step())
        except Exception as exc:
            failure = exc.with_traceback(None)
            log.warning("a decode step of %d rows failed (%s: %s)", self.decoder.running, type(failure).__name__,
                        failure)
            if isinstance(failure, torch.cuda.OutOfMemoryError):
                self.decoder.out_of_memory()
            for ticket in self.decoder.abort():
                _fail(ticket, failure)
        stats.steps += 1
        stats.decode_s += time.perf_counter() - started

    def _poll_cancel(self) -> None:
        """End the rows (and drop the waiting tickets) of the jobs the store said are canceled, as soon as it has
        said so; every CANCEL_POLL_S, ask it again about the jobs here now."""
        try:
            ids = self.cancel_answers.get_nowait()
        except queue.Empty:
            ids = set()
        if ids:
            self._end_canceled(ids)
        if time.monotonic() - self.last_cancel_poll < CANCEL_POLL_S:
            return
        self.last_cancel_poll = time.monotonic()
        asked = [row.tag.job_id for row in self.decoder.rows if row is not None] + [t.job_id for t in self.deferred]
        try:
            self.cancel_asks.put_nowait(asked)
        except queue.Full:
            pass  # the last question is still being answered

    def _watch_cancels(self) -> None:
        """Ask the store which of the posted jobs are canceled, off the GPU thread: its round trip and the parsing
        of one reply per job (1.7 ms of Python for 256 jobs, 3 ms for 768, on a local Redis) used to run between
        two decode steps. A store that does not answer ends no run: the next question asks again."""
        while True:
            ids = self.cancel_asks.get()
            try:
                canceled = self.canceled(ids)
            except Exception as exc:
                log.warning("could not ask which jobs are canceled (%s: %s)", type(exc).__name__, exc)
                continue
            if canceled:
                self.cancel_answers.put(canceled)  # waits while the GPU thread has the last answer still to take

    def _end_canceled(self, ids: set[str]) -> None:
        running = [row.tag for row in self.decoder.rows if row is not None]
        _resolve(self.decoder.cancel({t for t in running if t.job_id in ids}))
        for ticket in [t for t in self.deferred if t.job_id in ids]:
            self.deferred.remove(ticket)
            _resolve([(ticket, Completion([], ticket.prompt.length, canceled=True))])


def _resolve(ended: list[tuple[Ticket, Completion]]) -> None:
    for ticket, completion in ended:
        if not ticket.future.done():
            ticket.future.set_result(completion)


def _fail(ticket: Ticket, exc: BaseException) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(exc)
