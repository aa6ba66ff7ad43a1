"""The state machine: the transition table, and the store applying it atomically in Redis."""

from __future__ import annotations

import itertools
import threading

import pytest

from shared.jobs import TERMINAL, TRANSITIONS, JobFailure, JobStatus, can_transition
from shared.store.jobs import JobStore
from tests.jobs import UNCONSUMED_QUEUE, make_job

LEGAL = {
    (JobStatus.QUEUED, JobStatus.RUNNING), (JobStatus.QUEUED, JobStatus.FAILED),
    (JobStatus.QUEUED, JobStatus.CANCELED), (JobStatus.RUNNING, JobStatus.RUNNING),
    (JobStatus.RUNNING, JobStatus.SUCCEEDED), (JobStatus.RUNNING, JobStatus.FAILED),
    (JobStatus.RUNNING, JobStatus.CANCELED),
}
ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))


def test_terminal_states_are_exactly_the_three_ends():
    assert TERMINAL == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    assert [s for s in JobStatus if s.is_terminal()] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
    assert all(not TRANSITIONS[s] for s in TERMINAL)


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_table_allows_exactly_the_legal_moves(current, new):
    assert can_transition(current, new) == ((current, new) in LEGAL)


def _mark(store: JobStore, job_id: str, status: JobStatus):
    failure = JobFailure(code="x", message="y")
    from shared.jobs import JobResult, Timings, TokenCounts

    result = JobResult(text="t", model="m", tokens=TokenCounts(prompt=1, completion=1),
                       timings=Timings(queue_ms=0, images_ms=0, inference_ms=0))
    return {
        JobStatus.RUNNING: lambda: store.mark_running(job_id, "w@test"),
        JobStatus.SUCCEEDED: lambda: store.mark_succeeded(job_id, result),
        JobStatus.FAILED: lambda: store.mark_failed(job_id, failure),
        JobStatus.CANCELED: lambda: store.mark_canceled(job_id, failure),
    }[status]()


MARKABLE = [s for s in JobStatus if s is not JobStatus.QUEUED]  # nothing moves a job back to queued
STORE_PAIRS = list(itertools.product(JobStatus, MARKABLE))


@pytest.mark.parametrize(("current", "new"), STORE_PAIRS, ids=[f"{a}->{b}" for a, b in STORE_PAIRS])
def test_store_applies_legal_and_refuses_illegal_moves(store, current, new):
    job = make_job(current)
    store.create(job, UNCONSUMED_QUEUE)
    outcome = _mark(store, job.id, new)
    assert outcome.applied == ((current, new) in LEGAL)
    assert outcome.previous == current
    assert store.get(job.id).status == (new if outcome.applied else current)


def test_a_late_success_never_overwrites_a_cancel(store):
    job = make_job(JobStatus.RUNNING)
    store.create(job, UNCONSUMED_QUEUE)
    assert _mark(store, job.id, JobStatus.CANCELED).applied
    assert not _mark(store, job.id, JobStatus.SUCCEEDED).applied
    stored = store.get(job.id)
    assert stored.status == JobStatus.CANCELED and stored.result is None


def test_racing_terminal_writes_leave_exactly_one_winner(store):
    job = make_job(JobStatus.RUNNING)
    store.create(job, UNCONSUMED_QUEUE)
    barrier = threading.Barrier(8)
    outcomes = []

    def race(status):
        barrier.wait()
        outcomes.append((status, _mark(store, job.id, status).applied))

    targets = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.SUCCEEDED] * 2
    threads = [threading.Thread(target=race, args=(s,)) for s in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [status for status, applied in outcomes if applied]
    assert len(winners) == 1
    assert store.get(job.id).status == winners[0]


def test_missing_job_is_not_created_by_a_transition(store):
    outcome = _mark(store, "does-not-exist", JobStatus.RUNNING)
    assert not outcome.applied and outcome.previous is None
    assert store.get("does-not-exist") is None


def test_running_counts_attempts(store):
    job = make_job()
    store.create(job, UNCONSUMED_QUEUE)
    assert [store.mark_running(job.id, "w").attempts for _ in range(3)] == [1, 2, 3]
