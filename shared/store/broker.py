"""visionq's side of Celery's Redis transport (kombu's internals are known here and in lua/ only): the Celery app's
settings, the queue message the API writes itself, leases on delivered messages, and the sweep for lost ones.

The API does not publish through Celery: create_job.lua writes the job's hash and its queue message (built here)
in one step, so that a job is never stored without being queued, nor queued without being stored, and a submit
costs one round trip. The message is Celery's task protocol v2 as kombu's Redis transport stores it;
tests/unit/shared/store/test_broker.py checks it against what Celery itself sends.

Redis has no acknowledgements: kombu keeps each delivered message in the `unacked` hash, its delivery time in the
`unacked_index` zset, and any worker's periodic sweep puts it back on its queue once that time is older than the
visibility timeout. Live workers move those times to "now" at each heartbeat (renew_leases), so the timeout is a
lease that only a dead worker stops renewing. A message lost between a worker's BRPOP and kombu's write of its
unacknowledged copy (a Redis crash) is found by sweep_lost: every job carries a sequence number per queue, a start
moves the queue's watermark, and a job still queued below it for long enough has lost its message. A job gets its
number when it moves onto the list (shared/store/queues.py: before, it waits in its key's line, which only scripts
change, atomically with the job's status), so the list is in number order as before.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

import redis

from shared.config import Settings
from shared.routing import worker_queue
from shared.store import scripts
from shared.store.connection import is_sentinel_url
from shared.store.keys import (
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    job_key,
    queue_seq_key,
    queue_suspects_key,
    queue_watermark_key,
    queued_index_key,
    sweep_lock_key,
)
from shared.store.queues import WAITING_BASE

if TYPE_CHECKING:
    from celery import Celery

RUN_JOB_TASK = "visionq.run_job"
# The webhook tasks (shared/webhooks/delivery_app.py): move due deliveries to the queue; send one delivery.
DISPATCH_WEBHOOKS_TASK = "visionq.dispatch_webhooks"
DELIVER_WEBHOOK_TASK = "visionq.deliver_webhook"
# The batch worker's tasks (shared/batches/worker_app.py): read and admit the next chunk of a batch's lines; cancel
# its active items; write its results and tell its end; renew its items' lifetimes while it runs.
BATCH_STEP_TASK = "visionq.batch_step"
BATCH_CANCEL_TASK = "visionq.batch_cancel"
BATCH_FINISH_TASK = "visionq.batch_finish"
BATCH_KEEP_TASK = "visionq.batch_keep"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the Redis broker, configured so that no accepted job is lost."""
    from celery import Celery  # here: the API writes messages but runs no Celery app, and never loads Celery

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
            # The sweep's lock (kombu's default: 5 minutes) outlives a worker killed while it sweeps, and with
            # Redis's append-only file it outlives a Redis restart too: no worker could sweep until it expired. A
            # sweep takes milliseconds, and two at once are safe (each message is moved back in a WATCH
            # transaction), so a dead holder now delays the sweep by one interval.
            "unacked_mutex_expire": settings.restore_interval_s,
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


class Broker:
    """The leases of delivered messages, and the sweep for lost messages (the depths: shared/store/queues.py)."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._requeue_lost = scripts.register(client, "requeue_lost")

    def renew_leases(self, delivery_tags: list[str]) -> int:
        """Move these messages' delivery times to now (only those still unacknowledged); returns how many."""
        if not delivery_tags:
            return 0
        return self.redis.zadd(KOMBU_UNACKED_INDEX, dict.fromkeys(delivery_tags, time.time()), xx=True, ch=True)

    def sweep_lost(self, queue: str, worker: str, settings: Settings) -> list[str]:
        """Requeue the queue's jobs whose message was lost, one worker at a time: the lock lasts a heartbeat, so
        some live worker sweeps each queue about once a heartbeat. A dead worker's message comes back within a
        lease and a kombu sweep; a job is called lost only after twice that."""
        if not self.redis.set(sweep_lock_key(queue), worker, nx=True, px=max(1, int(settings.heartbeat_s * 1000))):
            return []
        return self.requeue_lost(queue, grace_s=2 * settings.visibility_timeout_s + settings.restore_interval_s)

    def requeue_lost(self, queue: str, grace_s: float, now: float | None = None) -> list[str]:
        """Find the queue's jobs whose message was lost and queue them again; returns their ids.

        Workers take messages in order, so a job whose sequence number is below the highest one started, or that
        waits while the queue is empty, should be running within moments. Such a job still queued `grace_s`
        after it was first seen so (long enough for a dead worker's message to come back through its lease) and
        whose message no worker holds has lost it. A job requeued while its message was merely slow to come back
        can run twice; the compare-and-set transitions still store one outcome.
        """
        now = time.time() if now is None else now
        behind = self._behind_watermark(queue)
        suspects = self._update_suspects(queue, behind, now)
        requeued = []
        for job_id in sorted(job_id for job_id in behind & set(suspects) if now - suspects[job_id] >= grace_s):
            keys = [job_key(job_id), queue, queued_index_key(queue), queue_seq_key(queue), KOMBU_UNACKED]
            if self._requeue_lost(keys=keys, args=[job_id, run_job_message(job_id, queue)]):
                requeued.append(job_id)
            self.redis.hdel(queue_suspects_key(queue), job_id)
        return requeued

    def _behind_watermark(self, queue: str) -> set[str]:
        index = queued_index_key(queue)
        started = int(self.redis.get(queue_watermark_key(queue)) or 0)
        behind = set(self.redis.zrangebyscore(index, "-inf", f"({started}", start=0, num=500))
        if self.redis.llen(queue) == 0:  # jobs waiting for the list (queues.py) are not on it: not lost here
            behind |= set(self.redis.zrangebyscore(index, "-inf", f"({WAITING_BASE}", start=0, num=500))
        return behind

    def _update_suspects(self, queue: str, behind: set[str], now: float) -> dict[str, float]:
        """When each job behind the watermark was first seen there; jobs no longer behind are forgotten."""
        key = queue_suspects_key(queue)
        suspects = {job_id: float(first) for job_id, first in self.redis.hgetall(key).items()}
        pipe = self.redis.pipeline(transaction=False)
        for job_id in set(suspects) - behind:
            pipe.hdel(key, job_id)
        for job_id in behind - set(suspects):
            pipe.hset(key, job_id, now)
        pipe.execute()
        return suspects
