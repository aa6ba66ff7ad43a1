"""The Celery task: a thin adapter from a queue message to the job runner."""

from __future__ import annotations

import redis
from celery.exceptions import Reject

from shared.store.broker import RUN_JOB_TASK
from worker import context
from worker.celery_app import app


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    """Run one job by id; its outcome goes to the job store, not to a Celery result backend."""
    try:
        context.current().runner.run(job_id)
    except redis.ConnectionError as exc:
        # The store is unreachable: keep the message so that the job runs again once Redis is back.
        raise Reject(exc, requeue=True) from exc
