"""The fault drill, short: jobs submitted while a worker is SIGKILLed mid-job, Redis is killed and restarted from
its AOF, and a worker gets SIGTERM mid-job; every accepted job ends exactly once (bench/fault_drill.py does 1,000)."""

from __future__ import annotations

from bench.fault_drill import DrillConfig, run_drill


def test_every_accepted_job_ends_exactly_once_through_worker_and_redis_faults(tiny_model_path, image_root, tmp_path):
    config = DrillConfig(jobs=60, workers=2, max_new_tokens=4, submit_s=2, long_tokens=384, finish_timeout_s=60)
    report = run_drill(config, tmp_path, tiny_model_path, image_root)
    print("\n".join(report.lines()))
    assert report.ok(), report.lines()
    assert report.accepted == 62  # the short jobs and the two long ones that were interrupted
    assert report.statuses == {"succeeded": 62}
    killed, redis_restart, termed = report.faults
    # Its lease ran out and another attempt finished it (a third if the Redis restart interrupted the second).
    assert 2 <= report.attempts_of(killed.job_id) <= 3
    assert report.attempts_of(termed.job_id) == 1  # warm shutdown: the worker finished it before exiting
    assert redis_restart.kind.startswith("Redis killed")
    # Only jobs interrupted by a fault ran twice: the killed worker's rows (with the block cache a worker runs every
    # job it holds at once: up to its share of the 60, 19 ran twice in one loaded run) and those the Redis restart
    # cut off; the other worker's share runs once. Redis's counts agree with what the workers wrote.
    assert set(report.attempts_histogram) <= {1, 2, 3} and report.attempts_histogram[1] >= report.accepted // 2
    assert report.status_counts == {"queued": 0, "running": 0, "succeeded": 62}
