"""The GPU worker of this process, composed once when Celery's worker starts (worker_init) and reached through
`current()`: its stores, the model's engine, the GPU thread's batcher and the job runner."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import redis
import torch

from shared.config import Settings
from shared.images.uploads import UploadStore
from shared.routing import webhook_queue, worker_queue
from shared.store.broker import Broker
from shared.store.connection import connect
from shared.store.queues import Queues
from shared.store.workers import WorkerRegistry
from worker import metrics
from worker.batcher import Batcher
from worker.decoding import BatchStats
from worker.engine import Engine, get_engine, load_count
from worker.observe import ObservedJobStore
from worker.preprocess import Preprocessor, pool_size
from worker.runner import JobRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuWorker:
    """Everything one worker process runs jobs with."""

    name: str
    settings: Settings
    store: ObservedJobStore
    workers: WorkerRegistry
    broker: Broker
    engine: Engine
    runner: JobRunner
    queues: Queues
    preprocessor: Preprocessor


_current: GpuWorker | None = None


def current() -> GpuWorker:
    """This process's worker; a task that runs before worker_init composed it is a bug."""
    if _current is None:
        raise RuntimeError("the GPU worker is not started: worker.celery_app's worker_init has not run")
    return _current


def start(settings: Settings, name: str) -> GpuWorker:
    """Load the model once, start the GPU thread, and publish what was loaded."""
    global _current
    client = connect(settings)
    store = ObservedJobStore(client, settings.result_ttl_s, settings.idempotency_ttl_s, webhook_queue(settings),
                             settings.broker_window)
    workers = WorkerRegistry(client)
    queues = Queues(client, settings.broker_window)
    queues.starting(worker_queue(settings), name)  # until the model is loaded, its jobs wait on "worker_starting"
    engine = get_engine(settings)
    batcher = Batcher(engine.decoder, settings.max_batch, settings.batch_wait_ms / 1000,
                      settings.batch_fill_ms / 1000, store.canceled_among,
                      on_batch=batch_recorder(name, engine.device, workers), step_tokens=settings.step_prefill_tokens)
    preprocessor = Preprocessor(settings, engine.encoder, pool_size(settings.preprocess_processes, engine.device),
                                on_respawn=lambda pids: workers.record(name, preprocess_pids=pids))
    runner = JobRunner(settings, store, workers, engine, batcher, name, preprocessor, uploads=UploadStore(settings))
    # The GPU thread launches kernels between the task threads' Python: let it have the GIL back sooner.
    sys.setswitchinterval(0.0005)
    workers.record(name, fresh=True, model=engine.model_id, device=str(engine.device), dtype=str(engine.dtype),
                   attention=engine.model.config._attn_implementation, graphs=engine.decoder.use_graphs,
                   fused=engine.fused, max_batch=settings.max_batch, loads=load_count(), pid=os.getpid(),
                   preprocess_pids=preprocessor.pids)
    _current = GpuWorker(name, settings, store, workers, Broker(client), engine, runner, queues, preprocessor)
    return _current


def stop() -> None:
    """After the warm shutdown (no task runs any more): the preprocessing processes end with the worker."""
    if _current is not None:
        _current.preprocessor.close()


def batch_recorder(name: str, device: torch.device, workers: WorkerRegistry):
    """After each run of the GPU thread: count it in the worker's record, with the most rows it decoded at once
    and the GPU's peak memory so far."""
    peak_rows = 0

    def record(stats: BatchStats) -> None:
        nonlocal peak_rows
        peak_rows = max(peak_rows, stats.peak_rows)
        log.debug("run of %d jobs, at most %d rows at once (rows %d x %d, graphed %s): prefill %.3f s, "
                  "%d steps in %.3f s", stats.rows, stats.peak_rows, stats.cache_rows, stats.cache_length,
                  stats.graphed, stats.prefill_s, stats.steps, stats.decode_s)
        metrics.batch_done(stats.rows, stats.prefill_s, stats.decode_s)
        try:
            workers.count_batch(name, stats)
            workers.record(name, peak_rows=peak_rows)
            if device.type == "cuda":
                workers.record(name, gpu_peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
        except redis.RedisError:
            log.warning("could not record a batch: Redis unreachable")
    return record
