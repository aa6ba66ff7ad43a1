"""The queue's policy between submit and Celery: fair share across API keys, priorities within a key, deadlines,
and where a queued job stands (the Lua is in lua/dispatch.lua, lua/queue_position.lua; the figures of a queue that
every one of its jobs shares: QueueFigures).

A job waits in a zset per key and model (by priority, then submission) and moves to the model's Celery list only
while that list holds fewer than `window` messages. Workers take from the list what their slots allow, so the list
holds only the surplus: a short list keeps the policy's order, and the rest waits where the policy can still choose.
The move is part of the scripts that already own create and transition (atomic with them): create moves jobs when
the list has room, a start refills the list it took from, a job that ends while queued (canceled, past its
deadline) takes its message back off the list and refills it, and each model's periodic tick (a worker's heartbeat
thread: `tick`) moves what those missed and ends the jobs past their deadline. Keys take turns by weighted fair
queuing (virtual time: each dispatch advances the key's time by 1 / its weight), so a key with 100,000 queued jobs
and a key with 10 get the list in turns from the moment the second one submits. Celery stays the transport: its
list, leases and redelivery are unchanged, and the lost-message sweep (broker.py) covers the list as before.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import redis

from shared.jobs import QueuePlace
from shared.store import scripts
from shared.store.keys import (
    KEY_WEIGHTS,
    deadlines_key,
    job_key,
    owner_vtimes_key,
    queue_clock_key,
    queue_ends_key,
    queue_minute_ends_key,
    queue_seq_key,
    queue_starting_key,
    queue_tick_lock_key,
    queue_watermark_key,
    queue_workers_key,
    queued_index_key,
    waiting_key,
    waiting_owners_key,
)

log = logging.getLogger(__name__)
WAITING_BASE = 2**50  # a waiting job's index score is this plus its sequence number (lua/queue_keys.lua)
LIVE_WITHIN_S = 30  # a worker that beat within this long serves its queue

# Every key of one queue's structures, as templates with {queue} (and {owner}, {job}, {bucket}) for the scripts.
TEMPLATES = json.dumps({
    "index": queued_index_key("{queue}"), "watermark": queue_watermark_key("{queue}"), "seq": queue_seq_key("{queue}"),
    "waiting": waiting_key("{queue}", "{owner}"), "owners": waiting_owners_key("{queue}"),
    "clock": queue_clock_key("{queue}"), "vtimes": owner_vtimes_key("{queue}"), "weights": KEY_WEIGHTS,
    "deadlines": deadlines_key("{queue}"), "job": job_key("{job}"), "ends": queue_ends_key("{queue}", "{bucket}"),
    "minutes": queue_minute_ends_key("{queue}", "{minute}"),
    "serving": queue_workers_key("{queue}"), "starting": queue_starting_key("{queue}"),
})


@dataclass(frozen=True)
class Figures:
    """What a queue's workers say, the same for each of its jobs: live and loading workers, jobs ended lately."""

    live_workers: int
    starting_workers: int
    ended_last_minute: int

    @staticmethod
    def ask(pipe, queue: str) -> None:
        """Queue the three reads of a queue's figures on a pipeline (`from_replies` takes their replies)."""
        now = time.time()
        bucket = math.floor(now / 10)
        pipe.zcount(queue_workers_key(queue), now - LIVE_WITHIN_S, "+inf")
        pipe.zcount(queue_starting_key(queue), now - LIVE_WITHIN_S, "+inf")
        pipe.mget([queue_ends_key(queue, str(b)) for b in range(bucket - 6, bucket)])

    @classmethod
    def from_replies(cls, live: int, starting: int, ends: list) -> Figures:
        return cls(live, starting, sum(int(e or 0) for e in ends))


class QueueFigures:
    """Each queue's figures, kept `ttl_s` in this process: every poll of a queued job needs them, and they move only
    with heartbeats (every heartbeat_s) and 10-second buckets, so reading them in each poll's script (a third of
    its commands, half its time) bought nothing. Positions are never cached: they are read with the job."""

    def __init__(self, client: redis.Redis, ttl_s: float = 1.0):
        self.redis, self.ttl_s = client, ttl_s
        self._kept: dict[str, tuple[float, Figures]] = {}  # queue -> (monotonic time it expires, figures)

    def of(self, queue: str) -> Figures:
        kept = self._kept.get(queue)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        figures = self.read(queue)
        if len(self._kept) > 1000:  # queue names come from the server's models, but bound it all the same
            self._kept.clear()
        self._kept[queue] = (time.monotonic() + self.ttl_s, figures)
        return figures

    def read(self, queue: str) -> Figures:
        """The figures as they stand, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        Figures.ask(pipe, queue)
        return Figures.from_replies(*pipe.execute())


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: the jobs ahead as the position script reads them, and its queue's figures."""

    ahead: int
    own_key_ahead: int  # 1: every waiting job that goes first is its own key's (the key gets all its turns)
    figures: Figures

    @classmethod
    def from_reply(cls, reply: list, figures: Figures) -> Place:
        return cls(int(reply[0]), int(reply[1]), figures)

    def public(self) -> QueuePlace:
        """The `queue` object of a queued job: position, eta_s (null when no throughput was measured), reason."""
        rate = self.figures.ended_last_minute / 60
        eta = round((self.ahead + 1) / rate, 1) if rate > 0 and self.figures.live_workers else None
        return QueuePlace(position=self.ahead, eta_s=eta, waiting_reason=self.reason())

    def reason(self) -> str:
        """no_worker, worker_starting (a worker is loading the model), key_at_capacity (only its own key's jobs
        are ahead of it: the key already has every turn the policy gives it) or behind_other_jobs."""
        if not self.figures.live_workers:
            return "worker_starting" if self.figures.starting_workers else "no_worker"
        return "key_at_capacity" if self.own_key_ahead else "behind_other_jobs"


class Queues:
    """Dispatch, the periodic tick, deadlines, which workers serve a queue, and the queues' figures."""

    def __init__(self, client: redis.Redis, window: int):
        self.redis = client
        self.window = window
        self._dispatch = scripts.register(client, "dispatch_now")
        self._rejoin = scripts.register(client, "rejoin_line")
        self._cursor: dict[str, float] = {}  # where this process's sweep of each queue's waiting jobs goes on

    def dispatch(self, queue: str) -> int:
        """Move waiting jobs onto the queue's list while it has room; returns how many moved."""
        return int(self._dispatch(keys=[queue], args=[TEMPLATES, self.window]))

    def tick(self, queue: str, worker: str, period_s: float, store) -> tuple[int, list[str]]:
        """One worker per queue per period: end the queue's jobs past their deadline, then refill its list.
        Returns (jobs moved, jobs ended)."""
        if not self.redis.set(queue_tick_lock_key(queue), worker, nx=True, px=max(1, int(period_s * 900))):
            return 0, []
        expired = self.expire_due(queue, store)
        for job_id in self.sweep_waiting(queue):
            log.warning("job %s was queued but in no key's line: put back", job_id)
        return self.dispatch(queue), expired

    def sweep_waiting(self, queue: str, count: int = 200) -> list[str]:
        """Check the next `count` of the queue's waiting jobs (a cursor that wraps around): each must be in its
        key's line; any that is not goes back (lua/rejoin_line.lua). Returns their ids."""
        start = self._cursor.get(queue, WAITING_BASE)
        batch = self.redis.zrangebyscore(queued_index_key(queue), f"({start}", "+inf", start=0, num=count,
                                         withscores=True)
        self._cursor[queue] = batch[-1][1] if len(batch) == count else WAITING_BASE
        if not batch:
            return []
        return self._rejoin(keys=[queue], args=[TEMPLATES, *(job_id for job_id, _ in batch)])

    def expire_due(self, queue: str, store, limit: int = 500) -> list[str]:
        """End failed (deadline_exceeded) the queue's queued jobs whose start deadline has passed; a job that
        started or ended meanwhile is left as it is (the transition is a compare-and-set from queued)."""
        due = self.redis.zrangebyscore(deadlines_key(queue), "-inf", time.time(), start=0, num=limit)
        ended = []
        for job_id in due:
            if store.fail_past_deadline(job_id).applied:
                ended.append(job_id)
            else:
                self.redis.zrem(deadlines_key(queue), job_id)  # not queued any more (or gone)
        return ended

    def starting(self, queue: str, worker: str) -> None:
        """A worker of this queue is loading its model (a job waiting on it says worker_starting)."""
        self.redis.zadd(queue_starting_key(queue), {worker: time.time()})

    def serving(self, queue: str, worker: str) -> None:
        """A worker of this queue is alive with its model loaded (each heartbeat)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(queue_workers_key(queue), {worker: time.time()})
        pipe.zrem(queue_starting_key(queue), worker)
        pipe.zremrangebyscore(queue_workers_key(queue), "-inf", time.time() - 24 * 3600)
        pipe.execute()

    def overview(self, queue: str, owner: str) -> dict:
        """A queue's figures for dashboards: jobs queued (all keys, and the caller's), workers, recent jobs/s."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(queued_index_key(queue))
        pipe.zcard(waiting_key(queue, owner))
        Figures.ask(pipe, queue)
        queued, mine, *replies = pipe.execute()
        figures = Figures.from_replies(*replies)
        return {"queued": queued, "queued_for_key": mine, "live_workers": figures.live_workers,
                "starting_workers": figures.starting_workers,
                "jobs_per_s": round(figures.ended_last_minute / 60, 2)}

    def history(self, queues: list[str], minutes: int = 60) -> list[int]:
        """Jobs these queues ended after running in each of the last `minutes` minutes, oldest first, the current
        (partial) minute last: the console's chart (lua/queue_keys.lua counts them)."""
        now_minute = math.floor(time.time() / 60)
        span = range(now_minute - minutes + 1, now_minute + 1)
        if not queues:
            return [0] * minutes
        counts = self.redis.mget([queue_minute_ends_key(q, str(m)) for m in span for q in queues])
        return [sum(int(c or 0) for c in counts[i:i + len(queues)]) for i in range(0, len(counts), len(queues))]

    def depth(self, queues: list[str]) -> dict[str, int]:
        """Every job still queued in each queue: on the list or waiting for it (the autoscaler's true backlog)."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(queued_index_key(queue))
        return dict(zip(queues, pipe.execute(), strict=True))
