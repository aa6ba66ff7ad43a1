"""The webhook delivery worker: `celery -A worker.webhook_app worker -P threads -Q <queue>-webhooks`.

A CPU process apart from the GPU workers (it never imports torch nor loads a model), so that a slow receiver
holds a thread here, never a GPU. Its poller thread moves deliveries that have come due (retries, and attempts
whose worker died) from the due zset to the queue; a job's end also queues a dispatch at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import cache

import redis
from celery.signals import worker_ready

from shared.config import get_settings
from shared.netguard import guarded_client
from shared.queue import DELIVER_WEBHOOK_TASK, DISPATCH_WEBHOOKS_TASK, make_celery
from shared.store import JobStore, connect
from shared.webhook_store import WebhookStore
from worker.webhooks import Sender

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.task_default_queue = settings.webhook_queue
client = connect(settings)
hooks = WebhookStore(client, settings.webhook_queue)
jobs = JobStore(client, settings.result_ttl_s, webhook_queue=settings.webhook_queue)


@cache
def sender() -> Sender:
    """The process's sender, with its one guarded HTTP client."""
    return Sender(settings, jobs, hooks, guarded_client(settings))


@app.task(name=DISPATCH_WEBHOOKS_TASK)
def dispatch_webhooks() -> int:
    """Queue a send for every delivery that has come due."""
    return dispatch()


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(job_id: str, delivery_id: str) -> None:
    """One attempt at one delivery."""
    sender().deliver(job_id, delivery_id)


def dispatch(batch: int = 100) -> int:
    """Move due deliveries to the queue, `batch` at a time; how many were moved."""
    moved = 0
    while True:
        due = hooks.take_due(settings.webhook_lease_s, batch)
        hooks.enqueue(due)
        moved += len(due)
        if len(due) < batch:
            return moved


@worker_ready.connect
def start_poller(sender=None, **_kwargs) -> None:
    """Say this worker is up, and start polling for due deliveries."""
    name = getattr(sender, "hostname", None) or "webhooks"
    jobs.record_worker(name, pid=os.getpid(), role="webhooks")
    threading.Thread(target=poll_forever, name="visionq-webhook-poller", daemon=True).start()


def poll_forever() -> None:
    while True:
        try:
            dispatch()
        except redis.RedisError:
            log.warning("webhook poll failed: Redis unreachable")
        time.sleep(settings.webhook_poll_s)
