"""Finished jobs never change until they expire, so each API process keeps their public JSON for polls."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from shared.jobs import Job


@dataclass(frozen=True)
class CachedJob:
    owner: str | None
    body: str  # the job's public JSON
    expires_at: float  # time.time() after which the stored job is gone too


class FinishedJobs:
    """An LRU of terminal jobs' public JSON, bounded in entries, each dropped when the stored job expires."""

    def __init__(self, ttl_s: int, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedJob] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> CachedJob | None:
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None:
                return None
            if entry.expires_at <= time.time():
                del self._entries[job_id]
                return None
            self._entries.move_to_end(job_id)
            return entry

    def remember(self, job: Job) -> None:
        """Keep the job if it has ended (its expiry counts from its end, as the store's does)."""
        if not job.status.is_terminal() or job.finished_at is None:
            return
        entry = CachedJob(job.owner, job.public_json(), job.finished_at.timestamp() + self.ttl_s)
        with self._lock:
            self._entries[job.id] = entry
            self._entries.move_to_end(job.id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
