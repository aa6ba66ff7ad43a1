"""The Redis job store: round trips, expiry, and ?wait woken by pub/sub."""

from __future__ import annotations

import threading
import time

import pytest

from shared.jobs import JobFailure, JobStatus
from shared.store.broker import Broker
from shared.store.jobs import JobStore
from shared.store.keys import job_key
from shared.store.workers import WorkerRegistry
from tests.unit.test_jobs import UNCONSUMED_QUEUE, make_job


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


def test_worker_facts_round_trip(store):
    registry = WorkerRegistry(store.redis)
    registry.record("w1@test", fresh=True, model="m", loads=1)
    registry.count_job("w1@test", loads=1)
    registry.count_job("w1@test", loads=1)
    assert registry.info("w1@test") == {"model": "m", "loads": 1, "jobs": 2}


def test_create_queues_the_job_in_the_same_transaction(store):
    job = make_job()
    before = store.redis.llen("create-test")
    store.create(job, "create-test")
    assert store.redis.llen("create-test") == before + 1
    assert job.id in store.redis.lindex("create-test", 0)


def test_token_bucket_allows_the_burst_then_says_how_long_to_wait(store):
    from shared.store.rates import Charge, RateLimiter

    charge = Charge(f"bucket-{time.time_ns()}", rate_per_s=10, burst=3)
    rates = RateLimiter(store.redis)
    assert [rates.take(charge) for _ in range(3)] == [0, 0, 0]
    wait = rates.take(charge)
    assert 0 < wait <= 0.1 + 0.01  # one token comes back every 1/rate seconds
    time.sleep(wait + 0.01)
    assert rates.take(charge) == 0


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


def test_queue_depths_count_waiting_messages(store, broker):
    queue = f"{UNCONSUMED_QUEUE}-depth"
    store.redis.delete(queue)
    store.create(make_job(), queue)
    store.create(make_job(), queue)
    assert broker.depths([queue, f"{queue}-empty"]) == {queue: 2, f"{queue}-empty": 0}


@pytest.fixture
def broker(store) -> Broker:
    return Broker(store.redis)


def _fresh_queue(store) -> str:
    queue = f"lost-test-{time.monotonic_ns()}"
    store.redis.delete(queue)
    return queue


def test_a_job_whose_message_was_lost_is_queued_again_after_the_grace(store, broker):
    queue = _fresh_queue(store)
    lost, later = make_job(), make_job()
    store.create(lost, queue)
    store.create(later, queue)
    # A worker took both messages in order; a Redis crash kept the first job but lost its message.
    store.redis.rpop(queue)
    store.redis.rpop(queue)
    store.mark_running(later.id, "w1")
    assert broker.requeue_lost(queue, grace_s=60, now=1000.0) == []  # first seen below the watermark
    assert broker.requeue_lost(queue, grace_s=60, now=1030.0) == []  # within the grace
    assert broker.requeue_lost(queue, grace_s=60, now=1061.0) == [lost.id]
    assert lost.id in store.redis.lindex(queue, 0)
    assert store.status(lost.id) == JobStatus.QUEUED
    assert broker.requeue_lost(queue, grace_s=60, now=2000.0) == []  # its new message is newer than the watermark


def test_a_job_a_worker_still_holds_or_that_moved_on_is_left_alone(store, broker):
    queue = _fresh_queue(store)
    held, started, later = make_job(), make_job(), make_job()
    for job in (held, started, later):
        store.create(job, queue)
    messages = [store.redis.rpop(queue) for _ in range(3)]
    store.redis.hset("unacked", f"tag-{held.id}", messages[0])  # as kombu keeps a delivered message
    store.mark_running(later.id, "w1")
    broker.requeue_lost(queue, grace_s=60, now=1000.0)
    store.mark_running(started.id, "w1")  # its worker was only slow to start it
    assert broker.requeue_lost(queue, grace_s=60, now=1100.0) == []
    assert store.redis.llen(queue) == 0
    store.redis.hdel("unacked", f"tag-{held.id}")


def test_nothing_is_requeued_while_jobs_wait_their_turn(store, broker):
    queue = _fresh_queue(store)
    jobs = [make_job() for _ in range(3)]
    for job in jobs:
        store.create(job, queue)
    assert broker.requeue_lost(queue, grace_s=0, now=1000.0) == []
    assert broker.requeue_lost(queue, grace_s=0, now=5000.0) == []  # no job started past them; queue not empty
    assert store.redis.llen(queue) == 3
