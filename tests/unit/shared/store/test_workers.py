"""The worker registry: what a worker publishes about itself comes back as it was written."""

from __future__ import annotations

from shared.store.workers import WorkerRegistry


def test_worker_facts_round_trip(store):
    registry = WorkerRegistry(store.redis)
    registry.record("w1@test", fresh=True, model="m", loads=1)
    registry.count_job("w1@test", loads=1)
    registry.count_job("w1@test", loads=1)
    assert registry.info("w1@test") == {"model": "m", "loads": 1, "jobs": 2}
