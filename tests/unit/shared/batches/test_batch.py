"""The batch model: its state machine over every pair of statuses, the stored hash read back, and the ETA."""

from __future__ import annotations

import itertools

import pytest

from shared.batches.batch import (
    TERMINAL,
    TRANSITIONS,
    Batch,
    BatchInput,
    BatchSpec,
    BatchStatus,
    ItemDefaults,
    Phase,
    can_transition,
    sources_of,
    spec_json,
)

LEGAL = {
    (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS), (BatchStatus.VALIDATING, BatchStatus.FAILED),
    (BatchStatus.VALIDATING, BatchStatus.CANCELED), (BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED),
    (BatchStatus.IN_PROGRESS, BatchStatus.FAILED), (BatchStatus.IN_PROGRESS, BatchStatus.CANCELED),
    (BatchStatus.COMPLETED, BatchStatus.IN_PROGRESS),  # a retry of the failed items
}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(BatchStatus, BatchStatus)))
def test_every_pair_of_statuses(current, new):
    assert can_transition(current, new) == ((current, new) in LEGAL)


def test_only_a_completed_batch_leaves_an_end_and_only_to_run_again():
    assert TERMINAL == {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELED}
    assert all(not TRANSITIONS[status] for status in TERMINAL - {BatchStatus.COMPLETED})
    assert sources_of(BatchStatus.CANCELED) == [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]


def stored(**fields) -> dict[str, str]:
    spec = BatchSpec(input=BatchInput(kind="requests"), defaults=ItemDefaults(task="ocr"))
    base = {"id": "batch_1", "owner": "k", "status": "in_progress", "phase": Phase.ADMITTING, "spec": spec_json(spec),
            "created_at": "100", "attempt": "1", "queued": "5", "running": "2", "succeeded": "3", "failed": "0",
            "canceled": "0", "lines": "10"}
    return {**base, **{name: str(value) for name, value in fields.items()}}


def test_a_stored_batch_reads_back_with_its_counts():
    batch = Batch.from_hash(stored(), items=10, refused=1, now=200)
    assert batch.counts.model_dump() == {"lines": 10, "refused": 1, "items": 10, "queued": 5, "running": 2,
                                         "succeeded": 3, "failed": 0, "canceled": 0}
    assert batch.defaults.task == "ocr" and not batch.input_done and batch.owner == "k"
    assert "owner" not in batch.public()


def test_the_eta_follows_the_rate_of_ends_since_the_attempt_started():
    # 3 of 10 items ended in 30 s: 7 more take 70 s.
    assert Batch.from_hash(stored(attempt_started_at=100), 10, 0, now=130).eta_s == 70.0
    # A third of the input read: about 30 items expected, 27 to go at 0.1/s.
    partial = stored(attempt_started_at=100, offset=100, input_bytes=300)
    assert Batch.from_hash(partial, 10, 0, now=130).eta_s == 270.0
    assert Batch.from_hash(stored(attempt_started_at=100, succeeded=0), 10, 0, now=130).eta_s is None
    assert Batch.from_hash(stored(attempt_started_at=100, finished_at=130), 10, 0, now=130).eta_s is None
    # A retry counts only the ends of its own attempt: 1 in 10 s, 2 to go.
    retry = stored(attempt_started_at=100, succeeded=8, ended_base=7)
    assert Batch.from_hash(retry, 10, 0, now=110).eta_s == 20.0
