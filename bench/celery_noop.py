"""The anchor of bench/overhead.py: a Celery no-op task, solo worker, Redis broker and result backend."""

import os

from celery import Celery

url = os.environ["BENCH_REDIS_URL"]
app = Celery("noop", broker=url, backend=url)
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop() -> int:
    return 1
