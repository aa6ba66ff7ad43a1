"""The GPU worker's Celery app: `celery -A worker.celery_app worker` (threads pool, one process per GPU).

Importing it makes the app and connects Celery's signals; nothing else. The worker itself (its stores, the model,
the GPU thread that batches what the task threads prepare) is composed when the worker starts: worker_init fires
in the worker's one process, and worker/context.py keeps it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from typing import NoReturn

from celery.signals import setup_logging, task_postrun, task_prerun, worker_init, worker_shutdown

from shared.config import get_settings
from shared.images.decode import configure_pillow
from shared.store.broker import make_celery
from worker import context, heartbeat, observe

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
# Threads, not prefork: max_batch task threads wait on the running batch while as many prepare the next one. The
# queue is this model's (task_default_queue, shared/store/broker.py).
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = 2 * get_settings().max_batch

setup_logging.connect(observe.configure_logging)
task_prerun.connect(observe.enter_job)
task_postrun.connect(observe.leave_job)


@worker_init.connect
def start_worker(sender=None, **_kwargs) -> None:
    """Observe, load the model once for this process and start the GPU thread, then start beating."""
    settings = get_settings()
    name = str(getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}")
    try:
        observe.start(settings, name)
    except OSError as exc:
        stop_at_start(f"cannot serve metrics on port {settings.metrics_port} ({exc.strerror})")
    configure_pillow(settings)
    try:
        worker = context.start(settings, name)
    except Exception:
        stop_at_start(f"could not load {settings.model}", exc_info=True)
    # torch, transformers and the loaded model leave ~400,000 tracked objects: a full collection scans them all
    # (~160 ms on a 2-core CPU) holding the GIL, which stalls the GPU thread between steps. None of them is
    # garbage; freezing them leaves collections only what jobs make (as vLLM's freeze_gc_heap after its start).
    gc.collect()
    gc.freeze()
    heartbeat.start(name, settings, worker.workers, worker.broker, worker.queues, worker.store)


def stop_at_start(reason: str, exc_info: bool = False) -> NoReturn:
    """Celery logs a failing worker_init handler and serves anyway: it would take jobs without a model (or hang,
    never ready, when its metrics port is taken). A worker that cannot start exits, and its supervisor says so."""
    log.error("%s; the worker stops", reason, exc_info=exc_info)
    logging.shutdown()
    os._exit(3)


@worker_shutdown.connect
def stop_worker(sender=None, **_kwargs) -> None:
    """Sent once the warm shutdown has drained the tasks: close what the worker started beside its threads."""
    context.stop()
