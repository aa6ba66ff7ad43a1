"""The queue's policy against a real Redis (shared/store/queues.py, lua/dispatch.lua): keys take turns by weight,
priorities order a key's own jobs, the list never holds more than its window, positions say exactly how many jobs
start first, a job past its deadline never reaches a worker, and a job missing from its key's line is put back.
A worker is played by hand: take the list's oldest message (as Celery's BRPOP does) and mark its job running."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest

from shared.jobs import JobFailure, JobStatus
from shared.store.jobs import JobStore
from shared.store.keys import KEY_WEIGHTS, waiting_key, waiting_owners_key
from shared.store.queues import Queues
from shared.store.rates import UNLIMITED as UNLIMITED_CHARGE
from tests.jobs import make_job

WINDOW = 2


@pytest.fixture
def queue() -> str:
    return f"policy-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def small(store) -> JobStore:
    """The store with a list window of 2."""
    return JobStore(store.redis, store.ttl_s, window=WINDOW)


def submit(store: JobStore, queue: str, owner: str, count: int = 1, **fields) -> list[str]:
    ids = []
    for _ in range(count):
        job = make_job().model_copy(update={"owner": owner, **fields})
        assert store.create(job, queue).outcome == "created"
        ids.append(job.id)
    return ids


def take_and_start(store: JobStore, queue: str) -> str | None:
    """What a worker does: the oldest message off the list, then its job marked running (which refills the list)."""
    raw = store.redis.rpop(queue)
    if raw is None:
        return None
    job_id = json.loads(raw)["headers"]["id"]
    store.mark_running(job_id, "w1")
    return job_id


def run_all(store: JobStore, queue: str) -> list[str]:
    started = []
    while (job_id := take_and_start(store, queue)) is not None:
        started.append(job_id)
    return started


def owners(store: JobStore, started: list[str]) -> str:
    return "".join(store.get(job_id).owner[-1] for job_id in started)


def test_a_key_that_submits_later_gets_every_other_turn_not_the_end_of_the_line(small, queue):
    a_jobs = submit(small, queue, "owner-a", 20)
    b_jobs = submit(small, queue, "owner-b", 3)
    assert small.redis.llen(queue) == WINDOW  # the rest wait in their keys' lines
    started = run_all(small, queue)
    # A's first two were on the list before B came; then the turns alternate (a tie goes to the key sorting first).
    assert owners(small, started)[:8] == "aababab" + "a"
    assert [job for job in started if job in b_jobs] == b_jobs
    assert sorted(started) == sorted(a_jobs + b_jobs)


def test_a_key_of_weight_two_gets_two_turns_for_one(small, queue):
    small.redis.hset(KEY_WEIGHTS, "owner-h", 2)
    try:
        submit(small, queue, "owner-a", 12)
        submit(small, queue, "owner-h", 8)
        started = owners(small, run_all(small, queue))
    finally:
        small.redis.hdel(KEY_WEIGHTS, "owner-h")
    middle = started[2:14]  # after the two that were on the list before h came
    assert middle.count("h") == 8 and middle.count("a") == 4


def test_within_a_key_high_goes_before_normal_before_low_then_in_submission_order(small, queue):
    low = submit(small, queue, "owner-a", 3, priority="low")
    normal = submit(small, queue, "owner-a", 1, priority="normal")
    high = submit(small, queue, "owner-a", 2, priority="high")
    started = run_all(small, queue)
    assert started == low[:2] + high + normal + low[2:]  # two lows had reached the list before the rest came


def test_positions_are_the_jobs_that_start_first_and_only_go_down(small, queue):
    submit(small, queue, "owner-a", 6)
    submit(small, queue, "owner-b", 3, priority="low")
    submit(small, queue, "owner-b", 1, priority="high")
    waiting = small.redis.zrange(f"visionq:queued:{queue}", 0, -1)
    first = {job_id: small.charged_get(job_id, UNLIMITED_CHARGE)[1].queue.position for job_id in waiting}
    order, seen = [], dict(first)
    while (job_id := take_and_start(small, queue)) is not None:
        order.append(job_id)
        for other in waiting:
            job = small.charged_get(other, UNLIMITED_CHARGE)[1]
            if job.status == JobStatus.QUEUED:
                assert job.queue.position <= seen[other]
                seen[other] = job.queue.position
    assert first == {job_id: order.index(job_id) for job_id in waiting}


def test_the_list_never_holds_more_than_its_window(small, queue):
    submit(small, queue, "owner-a", 10)
    submit(small, queue, "owner-b", 10)
    for _ in range(5):
        assert small.redis.llen(queue) <= WINDOW
        take_and_start(small, queue)
    small.redis.rpop(queue)  # a message taken without a start (its job was canceled: the worker skips it)
    assert Queues(small.redis, WINDOW).dispatch(queue) == 1  # the tick refills what no transition did
    assert small.redis.llen(queue) == WINDOW


def test_a_job_past_its_deadline_never_reaches_the_list_and_ends_failed(small, queue):
    submit(small, queue, "owner-a", 2)  # the list is full
    past = make_job().model_copy(update={"owner": "owner-a", "start_within_s": 5.0,
                                         "created_at": make_job().created_at - timedelta(seconds=10)})
    small.create(past, queue)
    after = submit(small, queue, "owner-a")
    assert run_all(small, queue)[-1] == after[0]  # passed over, not run
    queues = Queues(small.redis, WINDOW)
    assert queues.expire_due(queue, small) == [past.id]
    job = small.get(past.id)
    assert job.status == JobStatus.FAILED and job.error.code == "deadline_exceeded"
    assert queues.expire_due(queue, small) == []  # once


def test_a_deadline_that_passes_on_the_list_fails_the_job_there(small, queue):
    soon = submit(small, queue, "owner-a", start_within_s=0.2)[0]
    later, waiting = submit(small, queue, "owner-a", 2)
    time.sleep(0.3)
    assert Queues(small.redis, WINDOW).expire_due(queue, small) == [soon]
    assert small.get(soon).error.code == "deadline_exceeded"
    assert run_all(small, queue) == [later, waiting]  # its slot went to the next job, its message off the list


def test_a_waiting_job_missing_from_its_keys_line_is_put_back_by_the_sweep(small, queue):
    submit(small, queue, "owner-a", 2)
    lost, kept = submit(small, queue, "owner-a", 2)
    small.redis.zrem(waiting_key(queue, "owner-a"), lost)  # a Redis that kept the job but not its place in line
    queues = Queues(small.redis, WINDOW)
    assert queues.sweep_waiting(queue) == [lost]
    assert queues.sweep_waiting(queue) == []
    assert sorted(run_all(small, queue)[2:]) == sorted([lost, kept])


def test_a_canceled_waiting_job_leaves_its_line_and_its_key_the_turns(small, queue):
    submit(small, queue, "owner-a", 2)
    waiting = submit(small, queue, "owner-b")[0]
    small.mark_canceled(waiting, JobFailure(code="canceled", message="test"))
    assert small.redis.exists(waiting_key(queue, "owner-b")) == 0
    assert small.redis.zscore(f"visionq:waiting:{queue}", "owner-b") is None
    assert len(run_all(small, queue)) == 2


def test_a_job_canceled_on_the_list_gives_its_slot_to_the_next_job_at_once(small, queue):
    on_list = submit(small, queue, "owner-a", WINDOW)
    waiting = submit(small, queue, "owner-a")[0]
    assert small.redis.llen(queue) == WINDOW  # full: the third waits in its key's line
    # No tick runs here (nothing calls Queues.tick): only the cancel's own transition can move the waiting job.
    assert small.mark_canceled(on_list[0], JobFailure(code="canceled", message="test")).applied
    assert small.redis.llen(queue) == WINDOW
    assert small.redis.zscore(waiting_owners_key(queue), "owner-a") is None  # its line is empty
    assert run_all(small, queue) == [on_list[1], waiting]  # the canceled job's message left the list


def test_a_job_canceled_after_a_worker_took_its_message_still_refills_the_list(small, queue):
    first, second = submit(small, queue, "owner-a", WINDOW)
    waiting = submit(small, queue, "owner-a")[0]
    assert json.loads(small.redis.rpop(queue))["headers"]["id"] == first  # held by a worker, not started yet
    small.mark_canceled(first, JobFailure(code="canceled", message="test"))
    assert run_all(small, queue) == [second, waiting]


def test_a_waiting_job_says_why_it_waits(small, queue):
    small = JobStore(small.redis, small.ttl_s, window=WINDOW, figures_ttl_s=0)  # the workers as they are now
    queues = Queues(small.redis, WINDOW)
    submit(small, queue, "owner-a", 2)
    mine = submit(small, queue, "owner-a", 2)
    theirs = submit(small, queue, "owner-b")[0]

    def reason(job_id: str) -> str:
        return small.charged_get(job_id, UNLIMITED_CHARGE)[1].queue.waiting_reason

    assert reason(mine[1]) == "no_worker"
    queues.starting(queue, "w-loading")
    assert reason(mine[1]) == "worker_starting"
    queues.serving(queue, "w-loading")
    assert reason(theirs) == "behind_other_jobs"  # owner-a's job goes first
    assert reason(mine[1]) == "behind_other_jobs"  # owner-b's job goes before it
    small.mark_canceled(theirs, JobFailure(code="canceled", message="test"))
    assert reason(mine[1]) == "key_at_capacity"  # only its own key's jobs wait ahead of it
    assert reason(mine[0]) == "behind_other_jobs"  # next in line: only the list is ahead


def test_a_queues_worker_figures_are_kept_for_their_ttl_and_positions_never(small, queue):
    store = JobStore(small.redis, small.ttl_s, window=WINDOW, figures_ttl_s=0.3)
    submit(store, queue, "owner-a", WINDOW)
    first, second = submit(store, queue, "owner-a", 2)

    def place(job_id: str):
        return store.charged_get(job_id, UNLIMITED_CHARGE)[1].queue

    assert place(second).waiting_reason == "no_worker" and place(second).position == WINDOW + 1
    Queues(store.redis, WINDOW).serving(queue, "w1")
    take_and_start(store, queue)  # the next job moves onto the list
    assert place(second).waiting_reason == "no_worker"  # the figures as this process last read them
    assert place(second).position == WINDOW  # the position as it is now
    time.sleep(0.35)
    assert place(second).waiting_reason == "behind_other_jobs"  # a live worker now: only the list is ahead


def test_the_depth_counts_every_queued_job_not_only_the_lists(small, queue):
    submit(small, queue, "owner-a", 5)
    submit(small, queue, "owner-b", 2)
    assert small.redis.llen(queue) == WINDOW
    assert Queues(small.redis, WINDOW).depth([queue]) == {queue: 7}
    take_and_start(small, queue)
    assert Queues(small.redis, WINDOW).depth([queue]) == {queue: 6}
