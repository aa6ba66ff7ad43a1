"""Leases on the jobs a worker holds, so that a dead worker's jobs come back in about a minute, not an hour.

Celery's Redis transport has no real acknowledgements: a delivered message sits in the `unacked` hash, its
delivery time in the `unacked_index` zset, and any worker's periodic sweep puts it back on its queue once that
time is older than the visibility timeout. A fixed timeout has to outlast the longest job, so a SIGKILLed
worker's job would wait an hour. Instead each live worker moves the time of every message it holds to "now" at
each heartbeat: the visibility timeout becomes a lease that only a dead (or frozen) worker stops renewing.
"""

from __future__ import annotations

import time

import redis
from celery.worker import state

# kombu's default key for delivery times (visionq sets no global_keyprefix).
UNACKED_INDEX = "unacked_index"


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker process has received and not yet acknowledged."""
    for _ in range(3):  # the consumer may add a request while we copy the set
        try:
            requests = list(state.reserved_requests)
            break
        except RuntimeError:
            continue
    else:
        return []
    return [request.message.delivery_tag for request in requests if request.message is not None]


def renew(client: redis.Redis, tags: list[str]) -> int:
    """Move these messages' delivery times to now (only those still unacknowledged); returns how many."""
    if not tags:
        return 0
    now = time.time()
    return client.zadd(UNACKED_INDEX, dict.fromkeys(tags, now), xx=True, ch=True)


def sweep_lost_messages(store, queue: str, worker: str, settings) -> list[str]:
    """Requeue the queue's jobs whose message was lost (JobStore.requeue_lost), one worker at a time: the lock
    lasts a heartbeat, so some live worker sweeps each queue about once a heartbeat."""
    lock = f"{queue}:sweeping"
    if not store.redis.set(f"visionq:{lock}", worker, nx=True, px=max(1, int(settings.heartbeat_s * 1000))):
        return []
    # A dead worker's message comes back within a lease and a sweep; wait twice that before calling one lost.
    return store.requeue_lost(queue, grace_s=2 * settings.visibility_timeout_s + settings.restore_interval_s)
