"""What a worker tells operators: JSON logs tagged with the job id, and metrics of each job's transitions.

Both hang off the job store's named transitions and Celery's signals, so the task and the runner stay as they
are: the worker's store is an ObservedJobStore, and worker/celery_app.py connects the handlers below.
"""

from __future__ import annotations

import logging

from shared import logs
from shared.config import Settings, get_settings
from shared.jobs import JobFailure, JobResult
from shared.store.jobs import JobStore, Transition
from worker import metrics

log = logging.getLogger("visionq.jobs")


class ObservedJobStore(JobStore):
    """The job store, logging each transition the worker attempts (with its job id) and counting applied ones.

    The log lines are the worker-side record of what ran: one `job running` line per attempt that started and
    one `job ended` line per outcome this worker tried to write, with whether the write applied."""

    def mark_running(self, job_id: str, worker: str) -> Transition:
        transition = super().mark_running(job_id, worker)
        if transition.applied:
            metrics.job_started(transition.attempts)
        log.info("job running", extra={"job_id": job_id, "event": "running", "applied": transition.applied,
                                       "attempt": transition.attempts})
        return transition

    def mark_succeeded(self, job_id: str, result: JobResult) -> Transition:
        transition = super().mark_succeeded(job_id, result)
        if transition.applied:
            metrics.job_succeeded(result)
        self._log_end(job_id, "succeeded", transition)
        return transition

    def mark_failed(self, job_id: str, failure: JobFailure, only_queued: bool = False) -> Transition:
        transition = super().mark_failed(job_id, failure, only_queued)
        if transition.applied:
            metrics.job_failed(failure.code)
        self._log_end(job_id, "failed", transition, code=failure.code)
        return transition

    @staticmethod
    def _log_end(job_id: str, status: str, transition: Transition, **fields: str) -> None:
        previous = transition.previous.value if transition.previous else None
        log.info("job ended", extra={"job_id": job_id, "event": "ended", "status": status,
                                     "applied": transition.applied, "previous": previous, **fields})


def configure_logging(loglevel=None, **_kwargs) -> None:
    """Celery leaves the logging to us when this signal has a receiver."""
    logs.configure(loglevel or get_settings().log_level, get_settings().log_format)


_tokens: dict[str, object] = {}


def enter_job(task_id=None, **_kwargs) -> None:
    """Celery's task_prerun: tag this thread's log lines with the job id."""
    _tokens[task_id] = logs.enter_job(task_id)  # the task id is the job id


def leave_job(task_id=None, **_kwargs) -> None:
    """Celery's task_postrun."""
    token = _tokens.pop(task_id, None)
    if token is not None:
        logs.leave_job(token)


def start(settings: Settings, name: str) -> None:
    """Tag every log line with the worker's name, and serve its metrics when a port is set."""
    logs.bind(worker=name)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, name, settings.model, settings.device)
