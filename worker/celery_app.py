"""The GPU worker's Celery app: `celery -A worker.celery_app worker` (threads pool, one process per GPU).

The model is loaded once, when the worker starts (worker_init fires in the worker's one process), together with
the GPU thread that batches the jobs the task threads prepare (worker/batcher.py).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import redis
import torch
from celery.signals import worker_init

from shared.config import get_settings
from shared.image_decode import configure_pillow
from shared.queue import make_celery
from shared.routing import worker_queue
from shared.store import connect
from shared.uploads import UploadStore
from worker import leases, metrics
from worker.batcher import Batcher
from worker.decoding import BatchStats
from worker.engine import get_engine, load_count
from worker.observe import ObservedJobStore
from worker.runner import JobRunner

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
# Threads, not prefork: max_batch task threads wait on the running batch while as many prepare the next one. The
# queue is this model's (task_default_queue, shared/queue.py).
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = 2 * settings.max_batch
store = ObservedJobStore(connect(settings), settings.result_ttl_s, webhook_queue=settings.webhook_queue)
runner: JobRunner | None = None  # set once the model is loaded
uploads = UploadStore(settings)
configure_pillow(settings)


@worker_init.connect
def load_model(sender=None, **_kwargs) -> None:
    """Load the model once for this process, start the GPU thread, publish what was loaded, and start beating."""
    global runner
    name = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    try:
        engine = get_engine(settings)
    except Exception:
        # Celery would log this and serve anyway, failing every job; a worker without its model must not start.
        log.exception("could not load %s; the worker stops", settings.model)
        logging.shutdown()
        os._exit(3)
    batcher = Batcher(engine.decoder, settings.max_batch, settings.batch_wait_ms / 1000,
                      settings.batch_fill_ms / 1000, store.canceled_among, on_batch=batch_recorder(name, engine.device))
    runner = JobRunner(settings, store, engine, batcher, name, uploads=uploads)
    # The GPU thread launches kernels between the task threads' Python: let it have the GIL back sooner.
    sys.setswitchinterval(0.0005)
    store.record_worker(name, fresh=True, model=engine.model_id, device=str(engine.device), dtype=str(engine.dtype),
                        attention=engine.model.config._attn_implementation, graphs=engine.decoder.use_graphs,
                        fused=engine.fused,
                        max_batch=settings.max_batch, loads=load_count(), pid=os.getpid())
    threading.Thread(target=beat_forever, args=(name,), name="visionq-heartbeat", daemon=True).start()


def batch_recorder(name: str, device: torch.device):
    """After each batch: count it in the worker's record, with the GPU's peak memory so far."""
    def record(stats: BatchStats) -> None:
        log.debug("batch of %d rows (cache %d x %d, graphed %s): prefill %.3f s, %d steps in %.3f s",
                  stats.rows, stats.cache_rows, stats.cache_length, stats.graphed, stats.prefill_s, stats.steps,
                  stats.decode_s)
        metrics.batch_done(stats.rows, stats.prefill_s, stats.decode_s)
        try:
            store.count_worker_batch(name, stats)
            if device.type == "cuda":
                store.record_worker(name, gpu_peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
        except redis.RedisError:
            log.warning("could not record a batch: Redis unreachable")
    return record


def beat_forever(name: str) -> None:
    """Tell Redis this worker is alive and renew its jobs' leases, also while a long job runs (torch releases
    the GIL)."""
    while True:
        try:
            store.heartbeat(name)
            leases.renew(store.redis, leases.held_delivery_tags())
            for job_id in leases.sweep_lost_messages(store, worker_queue(settings), name, settings):
                log.warning("job %s had lost its queue message (Redis crash?): queued again", job_id)
        except redis.RedisError:
            log.warning("heartbeat failed: Redis unreachable")
        time.sleep(settings.heartbeat_s)
