"""Jobs for tests of the store and the API's caches: made in memory, queued where no worker reads."""

from __future__ import annotations

from shared.jobs import Job, JobStatus, new_job_id, utcnow

UNCONSUMED_QUEUE = "unit-tests"  # no worker reads it: these jobs only exercise the store


def make_job(status: JobStatus = JobStatus.QUEUED) -> Job:
    return Job(id=new_job_id(), status=status, task="describe", images=["a.png"], image_count=1,
               question="q?", max_new_tokens=8, created_at=utcnow())
