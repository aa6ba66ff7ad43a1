"""The webhook delivery worker: `celery -A shared.webhooks.delivery_app worker -P threads -Q <queue>-webhooks`.

A CPU process apart from the GPU workers (it never imports torch nor loads a model), so that a slow receiver
holds a thread here, never a GPU. Its poller thread moves deliveries that have come due (retries, and attempts
whose worker died) from the due zset to the queue; a job's end also queues a dispatch at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cache

import redis
from celery.signals import worker_ready

from shared.config import Settings, get_settings
from shared.outbound.netguard import guarded_client
from shared.routing import webhook_queue
from shared.store.broker import DELIVER_WEBHOOK_TASK, DISPATCH_WEBHOOKS_TASK, make_celery
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry
from shared.webhooks.sender import Sender
from shared.webhooks.store import WebhookStore
from shared.webhooks.targets import webhook_guard

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.task_default_queue = webhook_queue(get_settings())


@dataclass(frozen=True)
class Delivery:
    """What the delivery worker's tasks use: one Redis client's stores and the sender with its guarded client."""

    settings: Settings
    hooks: WebhookStore
    sender: Sender
    workers: WorkerRegistry


@cache
def delivery() -> Delivery:
    """The process's stores and sender, made on first use (in the worker, never at import)."""
    settings = get_settings()
    client = connect(settings)
    hooks = WebhookStore(client, webhook_queue(settings))
    jobs = JobStore.from_settings(client, settings)
    sender = Sender(settings, jobs, hooks, guarded_client(webhook_guard(settings)))
    return Delivery(settings, hooks, sender, WorkerRegistry(client))


@app.task(name=DISPATCH_WEBHOOKS_TASK)
def dispatch_webhooks() -> int:
    """Queue a send for every delivery that has come due."""
    return dispatch()


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(job_id: str, delivery_id: str) -> None:
    """One attempt at one delivery."""
    delivery().sender.deliver(job_id, delivery_id)


def dispatch(batch: int = 100) -> int:
    """Move due deliveries to the queue, `batch` at a time; how many were moved."""
    hooks, lease_s = delivery().hooks, delivery().settings.webhook_lease_s
    moved = 0
    while True:
        due = hooks.take_due(lease_s, batch)
        hooks.enqueue(due)
        moved += len(due)
        if len(due) < batch:
            return moved


@worker_ready.connect
def start_poller(sender=None, **_kwargs) -> None:
    """Say this worker is up, and start polling for due deliveries."""
    name = getattr(sender, "hostname", None) or "webhooks"
    delivery().workers.record(name, pid=os.getpid(), role="webhooks")
    threading.Thread(target=poll_forever, name="visionq-webhook-poller", daemon=True).start()


def poll_forever() -> None:
    while True:
        try:
            dispatch()
        except redis.RedisError:
            log.warning("webhook poll failed: Redis unreachable")
        time.sleep(delivery().settings.webhook_poll_s)
