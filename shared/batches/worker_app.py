"""The batch worker: `celery -A shared.batches.worker_app worker -P threads -Q <queue>-batches` (`visionq batches
worker`). A CPU process of its own, beside the GPU workers and the webhook delivery worker: it reads batch inputs
(from Redis or S3), checks their lines and admits them as jobs a chunk at a time, cancels and finishes batches.
Reading a 200 MB manifest from S3 is slow, network-bound work that must hold neither a GPU nor the threads that send
webhooks, and the API answers at once because it does none of it.

Its poller thread queues the steps of batches that wait (for room under their key's cap, or after a read error),
and, every RESULT_TTL_S / 4, the renewal of each running batch's items' lifetimes (a batch may outlive them).
Every task is short (a step gives its thread back after STEP_BUDGET_S) and idempotent, so a worker that dies
mid-task leaves the message to be redelivered (acks late) and run again harmlessly.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import redis
from celery.exceptions import Reject
from celery.signals import worker_ready

from shared.batches.creator import Creator
from shared.batches.ending import Ending
from shared.config import Settings, get_settings
from shared.images.uploads import UploadStore
from shared.routing import batch_queue
from shared.store.api_keys import KeyStore
from shared.store.batches import BatchStore
from shared.store.broker import BATCH_CANCEL_TASK, BATCH_FINISH_TASK, BATCH_KEEP_TASK, BATCH_STEP_TASK, make_celery
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.task_default_queue = batch_queue(get_settings())


@dataclass(frozen=True)
class BatchWorker:
    """What the batch worker's tasks use, on one Redis client (and one for input bytes)."""

    settings: Settings
    batches: BatchStore
    creator: Creator
    ending: Ending
    workers: WorkerRegistry


@cache
def batch_worker() -> BatchWorker:
    """The process's stores, made on first use (in the worker, never at import)."""
    settings = get_settings()
    client = connect(settings)
    batches = BatchStore.from_settings(client, connect(settings, decode_responses=False), settings)
    jobs = JobStore.from_settings(client, settings)
    creator = Creator(settings, batches, jobs, KeyStore(client), UploadStore(settings))
    return BatchWorker(settings, batches, creator, Ending(settings, batches, jobs), WorkerRegistry(client))


def holder() -> str:
    """Who holds a batch's step: this process and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def requeued_when_redis_is_down(task: Callable[..., None]) -> Callable[..., None]:
    """The task's message goes back to the queue when Redis cannot be reached: every task is idempotent."""
    @functools.wraps(task)
    def run(*args: str) -> None:
        try:
            task(*args)
        except redis.ConnectionError as exc:
            raise Reject(exc, requeue=True) from exc
    return run


@app.task(name=BATCH_STEP_TASK)
@requeued_when_redis_is_down
def batch_step(batch_id: str) -> None:
    """Read, check and admit the batch's next lines."""
    batch_worker().creator.step(batch_id, holder())


@app.task(name=BATCH_CANCEL_TASK)
@requeued_when_redis_is_down
def batch_cancel(batch_id: str) -> None:
    """Stop the canceled batch's items still queued or running."""
    batch_worker().ending.cancel(batch_id)


@app.task(name=BATCH_FINISH_TASK)
@requeued_when_redis_is_down
def batch_finish(batch_id: str, attempt: str) -> None:
    """Write the ended batch's results and tell its end."""
    batch_worker().ending.finish(batch_id, int(attempt))


@app.task(name=BATCH_KEEP_TASK)
@requeued_when_redis_is_down
def batch_keep(batch_id: str) -> None:
    """Renew the lifetimes of a running batch's items."""
    batch_worker().creator.keep(batch_id)


def queue_due(batch: int = 100) -> int:
    """Queue the step of every batch whose wait is over, and the renewal of every running batch due for one; how
    many tasks."""
    worker = batch_worker()
    due = worker.batches.take_due(lease_s=max(10.0, 10 * worker.settings.batch_poll_s), limit=batch)
    worker.batches.enqueue_steps(due)
    keep = worker.batches.take_open(limit=batch)
    worker.batches.enqueue_steps(keep, BATCH_KEEP_TASK)
    return len(due) + len(keep)


@worker_ready.connect
def start_poller(sender=None, **_kwargs) -> None:
    """Say this worker is up, and start queueing the steps of waiting batches."""
    name = getattr(sender, "hostname", None) or "batches"
    batch_worker().workers.record(name, pid=os.getpid(), role="batches")
    threading.Thread(target=poll_forever, name="visionq-batch-poller", daemon=True).start()


def poll_forever() -> None:
    while True:
        try:
            queue_due()
        except redis.RedisError:
            log.warning("batch poll failed: Redis unreachable")
        time.sleep(batch_worker().settings.batch_poll_s)
