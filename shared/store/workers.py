"""The worker registry: which workers are alive (a heartbeat zset) and what each published about itself (a hash:
model, device, pid, how many models it loaded, jobs and batches handled), for /readyz, metrics, the supervisor and
tests."""

from __future__ import annotations

import json
import time

import redis

from shared.store import scripts
from shared.store.keys import WORKERS_KEY, worker_key


class WorkerRegistry:
    """Heartbeats and facts of the workers (GPU and webhook delivery workers alike)."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._max_field = scripts.register(client, "max_field")

    def record(self, name: str, fresh: bool = False, **fields: object) -> None:
        """Publish a worker's facts (model, loads, pid, ...); `fresh` drops those of an earlier process of the same
        name."""
        with self.redis.pipeline() as pipe:
            if fresh:
                pipe.delete(worker_key(name))
            pipe.hset(worker_key(name), mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.execute()

    def count_job(self, name: str, loads: int, tokens: int = 0) -> None:
        """One more job handled by this worker (with the tokens it generated, for the console's tokens/s), and how
        many models its process has loaded so far."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(worker_key(name), "jobs", 1)
        if tokens:
            pipe.hincrby(worker_key(name), "tokens", tokens)
        pipe.hset(worker_key(name), "loads", loads)
        pipe.execute()

    def count_batch(self, name: str, stats) -> None:
        """One more batch decoded (worker.decoding.BatchStats): counts, rows, the largest batch, GPU seconds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(worker_key(name), "batches", 1)
        pipe.hincrby(worker_key(name), "batched_jobs", stats.rows)
        self._max_field(keys=[worker_key(name)], args=["largest_batch", stats.rows], client=pipe)
        for field in ("prefill_s", "decode_s", "idle_s"):
            pipe.hincrbyfloat(worker_key(name), field, getattr(stats, field))
        pipe.execute()

    def info(self, name: str) -> dict[str, object]:
        """What a worker has published about itself."""
        raw = self.redis.hgetall(worker_key(name))
        return {key: json.loads(value) for key, value in raw.items()}

    def heartbeat(self, name: str) -> None:
        """The worker is alive now."""
        self.redis.zadd(WORKERS_KEY, {name: time.time()})

    def live(self, within_s: float) -> list[str]:
        """Workers whose last heartbeat is at most `within_s` old."""
        return self.redis.zrangebyscore(WORKERS_KEY, time.time() - within_s, "+inf")
