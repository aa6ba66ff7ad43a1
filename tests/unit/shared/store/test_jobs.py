"""The Redis job store: round trips, expiry, and ?wait woken by pub/sub."""

from __future__ import annotations

import threading
import time

from shared.jobs import JobFailure, JobStatus
from shared.store.jobs import JobStore
from shared.store.keys import job_key
from tests.jobs import UNCONSUMED_QUEUE, make_job


def test_create_and_get_round_trip(store):
    job = make_job()
    store.create(job, UNCONSUMED_QUEUE)
    assert store.get(job.id) == job


def test_jobs_expire_after_the_configured_ttl(store):
    job = make_job()
    store.create(job, UNCONSUMED_QUEUE)
    ttl = store.redis.ttl(job_key(job.id))
    assert 0 < ttl <= store.ttl_s


def test_terminal_transition_restarts_the_ttl(settings, store):
    short = JobStore(store.redis, ttl_s=5)
    job = make_job()
    short.create(job, UNCONSUMED_QUEUE)
    store.redis.expire(job_key(job.id), 2)
    short.mark_failed(job.id, JobFailure(code="x", message="y"))
    assert store.redis.ttl(job_key(job.id)) > 2


def test_wait_wakes_when_the_job_ends(store):
    job = make_job()
    store.create(job, UNCONSUMED_QUEUE)
    timer = threading.Timer(0.3, store.mark_failed, args=(job.id, JobFailure(code="x", message="y")))
    started = time.monotonic()
    timer.start()
    waited = store.wait(job.id, timeout_s=10)
    elapsed = time.monotonic() - started
    assert waited.status == JobStatus.FAILED
    assert 0.25 < elapsed < 5  # woken by the end, not by the 10 s timeout


def test_wait_returns_the_job_as_it_stands_at_the_timeout(store):
    job = make_job()
    store.create(job, UNCONSUMED_QUEUE)
    started = time.monotonic()
    assert store.wait(job.id, timeout_s=0.3).status == JobStatus.QUEUED
    assert time.monotonic() - started >= 0.3


def test_wait_on_an_unknown_job_returns_none_at_once(store):
    started = time.monotonic()
    assert store.wait("nope", timeout_s=5) is None
    assert time.monotonic() - started < 1


def test_create_queues_the_job_in_the_same_transaction(store):
    job = make_job()
    before = store.redis.llen("create-test")
    store.create(job, "create-test")
    assert store.redis.llen("create-test") == before + 1
    assert job.id in store.redis.lindex("create-test", 0)


def test_status_counts_move_with_each_transition(store):
    job = make_job()
    before = store.status_counts()
    store.create(job, UNCONSUMED_QUEUE)
    store.mark_running(job.id, "w")
    store.mark_running(job.id, "w")  # a redelivery: still one job running
    after_running = store.status_counts()
    store.mark_failed(job.id, JobFailure(code="x", message="y"))
    store.mark_failed(job.id, JobFailure(code="x", message="y"))  # refused: no second count
    after = store.status_counts()

    def moved(counts: dict, status: str) -> int:
        return counts.get(status, 0) - before.get(status, 0)

    assert (moved(after_running, "queued"), moved(after_running, "running")) == (0, 1)
    assert (moved(after, "queued"), moved(after, "running"), moved(after, "failed")) == (0, 0, 1)
