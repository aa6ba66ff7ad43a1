"""The Celery app's configuration, shared by the API (which only sends) and the worker (which consumes)."""

from __future__ import annotations

from celery import Celery

from shared.config import Settings

RUN_JOB_TASK = "visionq.run_job"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the Redis broker, configured so that no accepted job is lost."""
    app = Celery("visionq", broker=settings.broker_url)
    app.conf.update(
        # A job is acknowledged only after its outcome is stored; a worker that dies leaves it to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Results live in visionq's own job store, not in a Celery result backend.
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # An interrupted connection cancels the running job instead of risking a second copy after redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


def enqueue_job(app: Celery, job_id: str, queue: str) -> None:
    """Put a job id on the queue; the worker reads everything else from the store."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
