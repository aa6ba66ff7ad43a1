"""The Celery task: a thin adapter from a queue message to the job runner."""

from __future__ import annotations

import redis
from celery.exceptions import Reject

from shared.queue import RUN_JOB_TASK
from worker.celery_app import app, settings, store, uploads
from worker.engine import get_engine
from worker.runner import JobRunner


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> None:
    """Run one job by id; its outcome goes to the job store, not to a Celery result backend."""
    runner = JobRunner(settings, store, lambda: get_engine(settings), self.request.hostname or "worker", uploads)
    try:
        runner.run(job_id)
    except redis.ConnectionError as exc:
        # The store is unreachable: keep the message so that the job runs again once Redis is back.
        raise Reject(exc, requeue=True) from exc
