"""The worker registry: what a worker publishes about itself comes back as it was written."""

from __future__ import annotations

from shared.store.workers import WorkerRegistry


def test_worker_facts_round_trip(store):
    registry = WorkerRegistry(store.redis)
    registry.record("w1@test", fresh=True, model="m", loads=1)
    registry.count_job("w1@test", loads=1)
    registry.count_job("w1@test", loads=1)
    assert registry.info("w1@test") == {"model": "m", "loads": 1, "jobs": 2}


def test_generated_tokens_are_summed_for_the_console(store):
    registry = WorkerRegistry(store.redis)
    registry.record("w2@test", fresh=True, model="m")
    registry.count_job("w2@test", loads=1, tokens=7)
    registry.count_job("w2@test", loads=1)  # canceled or failed: no tokens
    registry.count_job("w2@test", loads=1, tokens=5)
    assert registry.info("w2@test")["tokens"] == 12
