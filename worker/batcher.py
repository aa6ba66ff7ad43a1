"""Micro-batching: task threads hand prepared prompts to one GPU thread, which decodes them in batches.

Celery runs the worker with a threads pool of 2 x max_batch: each task thread loads its job's images and runs the
processor (CPU work that overlaps the GPU), then waits here for its own completion. The GPU thread takes whatever
is waiting, up to `max_batch` rows (and what fits the KV budget), waiting at most `batch_wait_ms` for more (longer,
up to `batch_fill_ms`, only while other task threads are still preparing tickets); tickets that arrive while the
batch prefills join it between prefill chunks (so a burst makes full batches without the GPU idling to gather
them); and it resolves each job's future as soon as that row ends. A message is acknowledged only when its task
returns, after the result is stored, so a worker killed mid-batch leaves every unfinished job to be redelivered.
"""

from __future__ import annotations

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


@dataclass
class Ticket:
    """One job waiting for the GPU."""

    job_id: str
    prompt: Prompt
    future: Future = field(default_factory=Future)


class Batcher:
    """Owns the decoder; everything that touches the GPU happens on its one thread."""

    def __init__(self, decoder: Decoder, max_batch: int, wait_s: float, fill_wait_s: float = 0.0,
                 canceled: Callable[[list[str]], set[str]] = lambda ids: set(),
                 on_batch: Callable[[BatchStats], None] = lambda stats: None):
        self.decoder, self.max_batch, self.wait_s = decoder, max_batch, wait_s
        self.fill_wait_s = max(wait_s, fill_wait_s)
        self.canceled, self.on_batch = canceled, on_batch
        self.waiting: queue.Queue[Ticket] = queue.Queue()
        self.deferred: deque[Ticket] = deque()  # tickets that did not fit the last batch go first in the next
        self.preparing = 0  # task threads loading images for a ticket right now (see `expect`)
        self.lock = threading.Lock()
        self.idle_since = time.monotonic()
        self.thread = threading.Thread(target=self._loop, name="visionq-gpu", daemon=True)
        self.thread.start()

    @contextmanager
    def expect(self):
        """Held by a task thread while it prepares a ticket: a batch that is filling up waits for such tickets
        (at most `wait_s`), so a burst of jobs makes one full batch rather than a small one and then the rest."""
        with self.lock:
            self.preparing += 1
        try:
            yield
        finally:
            with self.lock:
                self.preparing -= 1

    def submit(self, job_id: str, prompt: Prompt) -> Future:
        """Queue one prompt; the future gets its Completion (or the exception that ended its batch)."""
        ticket = Ticket(job_id, prompt)
        self.waiting.put(ticket)
        return ticket.future

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            idle_s, self.idle_since = time.monotonic() - self.idle_since, time.monotonic()
            try:
                self._run(batch, idle_s)
            except BaseException:  # the GPU thread must outlive any batch
                log.exception("batch of %d failed outside its jobs", len(batch))
            self.idle_since = time.monotonic()

    def _collect(self) -> list[Ticket]:
        """Block for one ticket, then take more until max_batch, the KV budget or the wait runs out."""
        first = self.deferred.popleft() if self.deferred else self.waiting.get()
        batch, deadline = [first], time.monotonic() + self.wait_s
        fill_deadline = time.monotonic() + self.fill_wait_s
        longest = first.prompt.length + first.prompt.max_new_tokens
        while len(batch) < self.max_batch:
            try:
                ticket = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if self.preparing and time.monotonic() < fill_deadline:
                    deadline = min(time.monotonic() + 0.005, fill_deadline)
                    continue
                break
            need = max(longest, ticket.prompt.length + ticket.prompt.max_new_tokens)
            if len(batch) + 1 > self.decoder.max_rows(need):
                self.deferred.append(ticket)
                break
            batch.append(ticket)
            longest = need
        return batch

    def _run(self, batch: list[Ticket], idle_s: float = 0.0, join: bool = True) -> None:
        try:
            stats = self.decoder.generate([t.prompt for t in batch], self._resolver(batch), self._canceled_rows(batch),
                                          more=self._joiner(batch) if join else None, max_rows=self.max_batch)
        except Exception as exc:
            failure = exc.with_traceback(None)  # its frames hold the batch's GPU tensors: let them go
        else:
            stats.idle_s = idle_s
            self.on_batch(stats)
            return
        if isinstance(failure, torch.cuda.OutOfMemoryError):
            self.decoder.out_of_memory(len(batch))
        open_tickets = [t for t in batch if not t.future.done()]
        if len(open_tickets) == 1:
            _fail(open_tickets[0], failure)
            return
        # One bad prompt must not fail its neighbours, nor one batch too big for memory all of its jobs:
        # halve it until the halves run or the bad job is alone.
        log.warning("batch of %d failed (%s: %s); running it in halves", len(open_tickets),
                    type(failure).__name__, failure)
        half = len(open_tickets) // 2
        self._run(open_tickets[:half], join=False)
        self._run(open_tickets[half:], join=False)

    def _joiner(self, batch: list[Ticket]):
        """Tickets waiting now that fit the batch (no longer prompt, room for their tokens) join it: appended to
        `batch`, so their rows follow and resolve like the first ones."""
        def more(room: int, prompt_length: int, length: int) -> list[Prompt]:
            joined, unfit = [], []
            while len(joined) < room:
                try:
                    ticket = self.deferred.popleft() if self.deferred else self.waiting.get_nowait()
                except queue.Empty:
                    break
                fits = ticket.prompt.length <= prompt_length and prompt_length + ticket.prompt.max_new_tokens <= length
                (joined if fits else unfit).append(ticket)
            self.deferred.extend(unfit)
            batch.extend(joined)
            return [ticket.prompt for ticket in joined]
        return more

    @staticmethod
    def _resolver(batch: list[Ticket]) -> Callable[[int, Completion], None]:
        def resolve(row: int, completion: Completion) -> None:
            if not batch[row].future.done():
                batch[row].future.set_result(completion)
        return resolve

    def _canceled_rows(self, batch: list[Ticket]) -> Callable[[], set[int]]:
        """Rows whose job was canceled, asking the store at most every CANCEL_POLL_S."""
        last = [time.monotonic()]

        def canceled() -> set[int]:
            if time.monotonic() - last[0] < CANCEL_POLL_S:
                return set()
            last[0] = time.monotonic()
            ids = self.canceled([t.job_id for t in batch if not t.future.done()])
            return {row for row, t in enumerate(batch) if t.job_id in ids}
        return canceled


def _fail(ticket: Ticket, exc: BaseException) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(exc)
