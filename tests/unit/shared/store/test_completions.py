"""The process-wide completion listener: many waiters on one subscription, and it survives a Redis restart."""

from __future__ import annotations

import threading
import time

from cli.embedded_redis import EmbeddedRedis
from shared.jobs import JobFailure, JobStatus
from shared.store.connection import connect
from shared.store.jobs import JobStore
from tests.jobs import UNCONSUMED_QUEUE, make_job


def test_many_waiters_share_one_subscription(store):
    jobs = [make_job() for _ in range(20)]
    for job in jobs:
        store.create(job, UNCONSUMED_QUEUE)
    results: dict[str, JobStatus] = {}

    def waiter(job_id):
        results[job_id] = store.wait(job_id, timeout_s=10).status

    threads = [threading.Thread(target=waiter, args=(job.id,)) for job in jobs]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    for job in jobs:
        store.mark_failed(job.id, JobFailure(code="x", message="y"))
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 5
    assert set(results.values()) == {JobStatus.FAILED} and len(results) == 20
    channels = store.redis.pubsub_numpat()
    assert channels >= 1


def test_a_wait_survives_a_redis_restart(tmp_path, settings):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        store = JobStore(connect(settings.model_copy(update={"redis_url": server.url})), ttl_s=60)
        job = make_job()
        store.create(job, UNCONSUMED_QUEUE)
        outcome = {}
        waiting = threading.Thread(target=lambda: outcome.setdefault("job", store.wait(job.id, timeout_s=30)))
        waiting.start()
        time.sleep(0.3)
        server.stop()  # SHUTDOWN writes the AOF: the job survives the restart
        server.start()
        time.sleep(0.3)
        store.mark_failed(job.id, JobFailure(code="x", message="y"))
        waiting.join(timeout=30)
        assert outcome["job"].status == JobStatus.FAILED
    finally:
        server.stop()
