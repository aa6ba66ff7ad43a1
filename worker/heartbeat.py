"""What a live worker does every heartbeat: say it is alive, renew the leases of the jobs it holds, and (one
worker per queue at a time) sweep for jobs whose queue message was lost; and, more often, each model's queue tick
(shared/store/queues.py: jobs past their deadline end, waiting jobs move to the list if a transition missed them).

The leases are kombu's delivery times (shared/store/broker.py): renewed each heartbeat, a dead worker's jobs come
back in about a minute, not after a fixed timeout that has to outlast the longest job. A worker that hangs while
its process lives keeps renewing: restart it.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery.worker import state

from shared.config import Settings
from shared.routing import queue_for, worker_queue
from shared.store.broker import Broker
from shared.store.queues import Queues
from shared.store.workers import WorkerRegistry

log = logging.getLogger(__name__)


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


def beat(name: str, settings: Settings, workers: WorkerRegistry, broker: Broker, queues: Queues) -> None:
    """One heartbeat."""
    workers.heartbeat(name)
    queues.serving(worker_queue(settings), name)
    broker.renew_leases(held_delivery_tags())
    for job_id in broker.sweep_lost(worker_queue(settings), name, settings):
        log.warning("job %s had lost its queue message (Redis crash?): queued again", job_id)


def tick(name: str, settings: Settings, queues: Queues, store) -> None:
    """Every model's queue, not only this worker's: a model scaled to zero still ends its jobs past deadline."""
    for model in dict.fromkeys([settings.model, *settings.served_models]):
        for job_id in queues.tick(queue_for(settings, model), name, settings.queue_tick_s, store)[1]:
            log.info("job %s did not start within its deadline: failed", job_id)


def start(name: str, settings: Settings, workers: WorkerRegistry, broker: Broker, queues: Queues,
          store) -> threading.Thread:
    """Beat every settings.heartbeat_s (and tick the queues every queue_tick_s) in a daemon thread, also while a
    long job runs (torch releases the GIL)."""
    def beat_forever() -> None:
        next_beat = 0.0
        while True:
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + settings.heartbeat_s
                    beat(name, settings, workers, broker, queues)
                tick(name, settings, queues, store)
            except redis.RedisError:
                log.warning("heartbeat failed: Redis unreachable")
            except Exception:  # the thread must live on: it renews the leases of the jobs this worker holds
                log.exception("heartbeat failed")
            time.sleep(min(settings.heartbeat_s, settings.queue_tick_s))

    thread = threading.Thread(target=beat_forever, name="visionq-heartbeat", daemon=True)
    thread.start()
    return thread
