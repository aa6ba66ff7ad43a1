"""The API's cache of finished jobs: only ended jobs, bounded, and gone when the stored job would be."""

from __future__ import annotations

from datetime import timedelta

from api.job_cache import FinishedJobs
from shared.jobs import JobFailure, JobStatus, utcnow
from tests.jobs import make_job


def ended(**changes):
    job = make_job(JobStatus.FAILED).model_copy(update={"finished_at": utcnow(), "owner": "k1",
                                                        "error": JobFailure(code="x", message="y"), **changes})
    return job


def test_only_ended_jobs_are_kept():
    cache = FinishedJobs(ttl_s=60)
    running = make_job(JobStatus.RUNNING)
    cache.remember(running)
    assert cache.get(running.id) is None
    job = ended()
    cache.remember(job)
    entry = cache.get(job.id)
    assert entry.owner == "k1" and entry.body == job.public_json()


def test_an_entry_expires_with_the_stored_job():
    cache = FinishedJobs(ttl_s=60)
    stale = ended(finished_at=utcnow() - timedelta(seconds=61))
    cache.remember(stale)
    assert cache.get(stale.id) is None


def test_the_cache_is_bounded_least_recently_used_first():
    cache = FinishedJobs(ttl_s=60, max_entries=2)
    first, second, third = ended(), ended(), ended()
    cache.remember(first)
    cache.remember(second)
    cache.get(first.id)  # now the most recently used
    cache.remember(third)
    assert cache.get(second.id) is None
    assert cache.get(first.id) is not None and cache.get(third.id) is not None
