"""The queue: the Celery app the worker consumes with, and the message the API writes for each job.

The API does not publish through Celery: it writes the job's hash and its queue message in one Redis
transaction (see JobStore.create), so that a job is never stored without being queued, nor queued without
being stored, and a submit costs one round trip. The message is Celery's task protocol v2 as kombu's Redis
transport stores it; tests/unit/test_queue.py checks it against what Celery itself sends.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid

from celery import Celery

from shared.config import Settings
from shared.routing import worker_queue
from shared.sentinel import is_sentinel_url

RUN_JOB_TASK = "visionq.run_job"
# The webhook tasks (worker/webhook_app.py): move due deliveries to the queue; send one delivery.
DISPATCH_WEBHOOKS_TASK = "visionq.dispatch_webhooks"
DELIVER_WEBHOOK_TASK = "visionq.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the Redis broker, configured so that no accepted job is lost."""
    app = Celery("visionq", broker=settings.broker_url)
    app.conf.update(
        # A job is acknowledged only after its outcome is stored; a worker that dies leaves it to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for abandoned jobs every restore_interval_s (kombu's default is every 100 s).
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            **({"master_name": settings.redis_sentinel_master} if is_sentinel_url(settings.broker_url) else {}),
        },
        broker_connection_retry_on_startup=True,
        # Results live in visionq's own job store, not in a Celery result backend.
        task_ignore_result=True,
        task_default_queue=worker_queue(settings),
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # An interrupted connection cancels the running job instead of risking a second copy after redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


_ORIGIN = f"visionq-api-{os.getpid()}@{socket.gethostname()}"


def run_job_message(job_id: str, queue: str) -> str:
    """The queue entry that makes a worker run `visionq.run_job(job_id)`; the task id is the job id."""
    return task_message(RUN_JOB_TASK, [job_id], queue, job_id)


def task_message(task: str, args: list[str], queue: str, task_id: str | None = None) -> str:
    """The queue entry that makes a worker of `queue` run `task(*args)`, as Celery's send_task writes it."""
    task_id = task_id or str(uuid.uuid4())
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": repr(args or ()), "kwargsrepr": "{}", "origin": _ORIGIN,
        "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    properties = {
        "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
        "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers, "properties": properties,
    })
