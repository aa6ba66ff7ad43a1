"""Waiting for jobs to end: one pub/sub subscription per process wakes every thread that waits on a job.

A per-request SUBSCRIBE costs a connection and a round trip for each `?wait`; a process-wide pattern
subscription costs one connection, whatever the number of waiters, and is ready before anyone waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


class CompletionListener:
    """Listens for job-ended messages in a daemon thread and sets the events of the threads waiting on them."""

    def __init__(self, client: redis.Redis, pattern: str, job_id_of: Callable[[str], str]):
        self.redis = client
        self.pattern = pattern
        self.job_id_of = job_id_of  # channel name -> job id
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._pid: int | None = None
        self._failures = 0  # consecutive lost connections: only the first of an outage is worth a warning

    def register(self, job_id: str) -> threading.Event:
        """An event set when `job_id` may have ended; the caller re-reads the job to know."""
        self._ensure_running()
        event = threading.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        return event

    def unregister(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job_id]

    def _ensure_running(self, timeout_s: float = 5.0) -> None:
        # Started lazily in the serving process: a thread started before gunicorn forks would not survive it.
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._ready.clear()
                threading.Thread(target=self._listen_forever, name="visionq-completions", daemon=True).start()
        self._ready.wait(timeout_s)

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen()
            except redis.RedisError as exc:
                # Waiters sleep through the outage; the resubscription wakes them all to re-read their jobs.
                self._ready.clear()
                self._failures += 1
                log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                        "completion listener lost Redis (%s); resubscribing", type(exc).__name__)
                time.sleep(0.5)

    def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            pubsub.psubscribe(self.pattern)
            for message in pubsub.listen():
                if message["type"] == "psubscribe":
                    self._ready.set()
                    self._wake_all()  # anything that ended while we were not subscribed
                    self._failures = 0
                elif message["type"] == "pmessage":
                    self._wake(self.job_id_of(message["channel"]))
        finally:
            pubsub.close()

    def _wake(self, job_id: str) -> None:
        with self._lock:
            events = list(self._waiters.get(job_id, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [event for events in self._waiters.values() for event in events]
        for event in events:
            event.set()
