"""The worker's Celery app: `celery -A worker.celery_app worker -P solo` (one process per GPU).

The model is loaded when the worker process starts (worker_process_init fires under -P solo too), never per job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from celery.signals import worker_process_init

from shared.config import get_settings
from shared.queue import make_celery
from shared.store import connect
from worker import leases
from worker.engine import get_engine, load_count
from worker.observe import ObservedJobStore

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
store = ObservedJobStore(connect(settings), settings.result_ttl_s)


@worker_process_init.connect
def load_model(sender=None, **_kwargs) -> None:
    """Load the model once for this process, publish what was loaded, and start beating."""
    name = sender or f"worker@{socket.gethostname()}"
    try:
        engine = get_engine(settings)
    except Exception:
        # Celery would log this and serve anyway, failing every job; a worker without its model must not start.
        log.exception("could not load %s; the worker stops", settings.model)
        logging.shutdown()
        os._exit(3)
    store.record_worker(name, model=engine.model_id, device=str(engine.device), dtype=str(engine.dtype),
                        attention=engine.model.config._attn_implementation,
                        loads=load_count(), pid=os.getpid())
    threading.Thread(target=beat_forever, args=(name,), name="visionq-heartbeat", daemon=True).start()


def beat_forever(name: str) -> None:
    """Tell Redis this worker is alive and renew its jobs' leases, also while a long job runs (torch releases
    the GIL)."""
    while True:
        try:
            store.heartbeat(name)
            leases.renew(store.redis, leases.held_delivery_tags())
        except redis.RedisError:
            log.warning("heartbeat failed: Redis unreachable")
        time.sleep(settings.heartbeat_s)
