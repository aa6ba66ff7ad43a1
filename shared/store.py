"""Every Redis read and write of visionq, and every key name: the job store and its atomic state machine."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import redis

from shared import lua
from shared.completions import CompletionListener
from shared.config import Settings
from shared.jobs import Job, JobFailure, JobResult, JobStatus, sources_of, utcnow
from shared.keys import ApiKey, hash_secret, key_id_of, new_secret
from shared.queue import DISPATCH_WEBHOOKS_TASK, run_job_message, task_message
from shared.sentinel import is_sentinel_url, primary_client

PREFIX = "visionq"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_done_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


JOB_DONE_PATTERN = job_done_channel("*")


def job_id_from_done_channel(channel: str) -> str:
    return channel[len(f"{PREFIX}:job:"):-len(":done")]


# Webhooks (shared/webhook_store.py): the transition script derives the delivery keys from the job's key in the
# same way, and the owner's endpoint hash from OWNER_PREFIX.
def delivery_key(job_id: str, delivery_id: str) -> str:
    return f"{job_key(job_id)}:delivery:{delivery_id}"


def delivery_log_key(job_id: str, delivery_id: str) -> str:
    return f"{delivery_key(job_id, delivery_id)}:log"


def deliveries_key(job_id: str) -> str:
    return f"{job_key(job_id)}:deliveries"


def webhooks_due_key(webhook_queue: str) -> str:
    """The zset of deliveries by due time, one per webhook queue (each stack's delivery workers poll theirs)."""
    return f"{PREFIX}:webhooks:{webhook_queue}:due"


def endpoints_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:webhooks"


def job_webhook_secret_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:webhook_secret"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


WORKERS_KEY = f"{PREFIX}:workers"  # zset: worker name -> time of its last heartbeat
# hash: status -> how many jobs are in it (queued, running) or have ended in it (terminal ones, since the start)
STATUS_COUNTS_KEY = f"{PREFIX}:stats:status"
OWNER_PREFIX = f"{PREFIX}:owner:"


def owner_jobs_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:jobs"


def owner_active_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:active"


def queued_index_key(queue: str) -> str:
    """Zset of a queue's jobs still queued (job id -> sequence number); `<it>:started` holds the highest sequence
    number a worker has started, `<it>:suspects` when each job below it was first seen still queued."""
    return f"{PREFIX}:queued:{queue}"


def queue_seq_key(queue: str) -> str:
    return f"{PREFIX}:queue-seq:{queue}"


KOMBU_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages (visionq sets no key prefix)


def idempotency_key(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def rate_key(owner: str) -> str:
    return f"{PREFIX}:rate:{owner}"


def api_key_key(secret_hash: str) -> str:
    return f"{PREFIX}:apikey:{secret_hash}"


API_KEY_IDS = f"{PREFIX}:apikeys"  # hash: key id -> secret hash


def upload_key(upload_id: str) -> str:
    """Hash of one upload (shared/uploads.py): owner, size, and the bytes or where they are in S3."""
    return f"{PREFIX}:upload:{upload_id}"


def upload_bytes_key(owner: str, window: int) -> str:
    """Bytes an owner uploaded in one window of upload_ttl_s seconds (shared/uploads.py's quota)."""
    return f"{PREFIX}:upload-bytes:{owner}:{window}"


def connect(settings: Settings, decode_responses: bool = True) -> redis.Redis:
    """The Redis client every visionq process uses (strings in, strings out; bytes for uploads); through Sentinel
    for sentinel:// URLs. A GPU worker runs 2 x max_batch task threads, each holding a connection now and then:
    redis-py's default pool stops at 100."""
    options = {"decode_responses": decode_responses, "health_check_interval": 30,
               "max_connections": max(100, 2 * settings.max_batch + 32)}
    if is_sentinel_url(settings.broker_url):
        return primary_client(settings.broker_url, settings.redis_sentinel_master, **options)
    return redis.Redis.from_url(settings.broker_url, **options)


@dataclass(frozen=True)
class Charge:
    """One request to take from an owner's token bucket."""

    owner: str
    rate_per_s: float
    burst: int


UNLIMITED = Charge("", 1e9, 10**9)


@dataclass(frozen=True)
class Created:
    """The outcome of JobStore.create: "created", "existing" (an idempotent repeat), "queue_full" or
    "rate_limited"."""

    outcome: str
    job_id: str
    same_request: bool = True  # for "existing": whether the earlier request had the same body
    retry_after_s: float = 0.0  # for "rate_limited"


@dataclass(frozen=True)
class Transition:
    """The outcome of a compare-and-set: whether it applied, and the status the job had before."""

    applied: bool
    previous: JobStatus | None
    attempts: int


class JobStore:
    """Jobs as Redis hashes with a TTL; status changes only through the transition script."""

    def __init__(self, client: redis.Redis, ttl_s: int, idempotency_ttl_s: int = 24 * 3600,
                 webhook_queue: str = "visionq-webhooks"):
        self.redis = client
        self.ttl_s = ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.webhook_queue = webhook_queue  # where a job's end puts its webhook dispatch message
        self._transition = client.register_script(lua.TRANSITION)
        self._create = client.register_script(lua.CREATE_JOB)
        self._requeue_lost = client.register_script(lua.REQUEUE_LOST)
        self._take_token = client.register_script(lua.TAKE_TOKEN)
        self._charged_get = client.register_script(lua.CHARGED_GET)
        # Its thread starts on the first wait, so workers, which never wait, never run one.
        self.completions = CompletionListener(client, JOB_DONE_PATTERN, job_id_from_done_channel)

    def create(self, job: Job, queue: str, *, max_active: int = 2**62, idempotency: str | None = None,
               request_hash: str = "", charge: Charge = UNLIMITED) -> Created:
        """Take the request from the owner's bucket, then store a new job and queue it, all or nothing; or find
        the job an earlier request with the same idempotency key made; or refuse when the owner already has
        `max_active` jobs queued or running. One round trip."""
        owner = job.owner or ""
        keys = [job_key(job.id), queue, owner_jobs_key(owner), owner_active_key(owner),
                idempotency_key(owner, idempotency) if idempotency else "", rate_key(charge.owner),
                STATUS_COUNTS_KEY, queued_index_key(queue), queue_seq_key(queue)]
        fields = [item for pair in job.to_hash().items() for item in pair]
        args = [self.ttl_s, max_active, job.created_at.timestamp(), job.id, request_hash, self.idempotency_ttl_s,
                run_job_message(job.id, queue), charge.rate_per_s, charge.burst, *fields]
        outcome, detail = self._create(keys=keys, args=args)
        if outcome == "existing":
            job_id, earlier_hash = detail.split(" ", 1)
            return Created("existing", job_id, earlier_hash == request_hash)
        if outcome == "rate_limited":
            return Created(outcome, "", retry_after_s=float(detail))
        return Created(outcome, job.id if outcome == "created" else "")

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it does not exist or has expired."""
        raw = self.redis.hgetall(job_key(job_id))
        return Job.from_hash(raw) if raw else None

    def charged_get(self, job_id: str, charge: Charge) -> tuple[float, Job | None]:
        """Take the request from the owner's bucket and read the job, in one round trip: (seconds to wait
        before a request may go ahead, 0 when this one may; the job)."""
        wait_s, flat = self._charged_get(keys=[rate_key(charge.owner), job_key(job_id)],
                                         args=[charge.rate_per_s, charge.burst])
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return float(wait_s), (Job.from_hash(raw) if raw else None)

    def status(self, job_id: str) -> JobStatus | None:
        """Only the job's status (one small read: the worker asks it between decode steps)."""
        value = self.redis.hget(job_key(job_id), "status")
        return JobStatus(value) if value else None

    def canceled_among(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs are canceled: one round trip for a whole batch (the GPU thread asks it)."""
        if not job_ids:
            return set()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "status")
            statuses = pipe.execute()
        return {job_id for job_id, status in zip(job_ids, statuses, strict=True) if status == JobStatus.CANCELED}

    def list_jobs(self, owner: str, status: JobStatus | None, limit: int, before: float | None,
                  scan_limit: int = 1000) -> tuple[list[Job], float | None]:
        """The owner's jobs, newest first, created before `before` (a timestamp), optionally of one status.
        Returns the page and the timestamp to continue from (None at the end); at most `scan_limit` entries
        are read per call, so a rare status cannot make one request read everything."""
        index = owner_jobs_key(owner)
        self.redis.zremrangebyscore(index, "-inf", time.time() - self.ttl_s)  # their hashes have expired
        page: list[Job] = []
        upper, scanned = (f"({before}" if before is not None else "+inf"), 0
        while len(page) < limit and scanned < scan_limit:
            batch = self.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=min(200, limit * 2),
                                                withscores=True)
            if not batch:
                return page, None
            jobs = self._get_many([job_id for job_id, _ in batch])
            for (_job_id, score), job in zip(batch, jobs, strict=True):
                scanned += 1
                upper = f"({score}"
                if job is not None and (status is None or job.status == status):
                    page.append(job)
                    if len(page) == limit:
                        return page, score
        return page, float(upper[1:])

    def _get_many(self, job_ids: list[str]) -> list[Job | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [Job.from_hash(raw) if raw else None for raw in pipe.execute()]

    def take_token(self, charge: Charge) -> float:
        """Spend one request from the owner's bucket: 0 when allowed, else the seconds until one is free."""
        return float(self._take_token(keys=[rate_key(charge.owner)], args=[charge.rate_per_s, charge.burst]))

    def mark_running(self, job_id: str, worker: str) -> Transition:
        """Queued (or redelivered while running) -> running; counts an attempt."""
        fields = {"started_at": utcnow().isoformat(), "worker": worker}
        return self._apply(job_id, JobStatus.RUNNING, fields, count_attempt=True)

    def mark_succeeded(self, job_id: str, result: JobResult) -> Transition:
        """Running -> succeeded, with the result."""
        return self._finish(job_id, JobStatus.SUCCEEDED, {"result": result.model_dump_json()})

    def mark_failed(self, job_id: str, failure: JobFailure) -> Transition:
        """Queued or running -> failed, with the reason."""
        return self._finish(job_id, JobStatus.FAILED, {"error": failure.model_dump_json()})

    def mark_canceled(self, job_id: str, failure: JobFailure) -> Transition:
        """Queued or running -> canceled, with who canceled and why."""
        return self._finish(job_id, JobStatus.CANCELED, {"error": failure.model_dump_json()})

    def _finish(self, job_id: str, status: JobStatus, fields: dict[str, str]) -> Transition:
        fields["finished_at"] = utcnow().isoformat()
        return self._apply(job_id, status, fields)

    def _apply(
        self, job_id: str, status: JobStatus, fields: dict[str, str], count_attempt: bool = False
    ) -> Transition:
        allowed = " ".join(sources_of(status))
        flat = [item for pair in fields.items() for item in pair]
        terminal = status.is_terminal()
        dispatch = task_message(DISPATCH_WEBHOOKS_TASK, [], self.webhook_queue) if terminal else ""
        args = [status.value, allowed, job_done_channel(job_id), self.ttl_s, "1" if terminal else "0",
                "1" if count_attempt else "0", OWNER_PREFIX, dispatch, *flat]
        keys = [job_key(job_id), webhooks_due_key(self.webhook_queue), self.webhook_queue, STATUS_COUNTS_KEY]
        applied, previous, attempts = self._transition(keys=keys, args=args)
        return Transition(bool(applied), JobStatus(previous) if previous else None, int(attempts))

    def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is terminal, or as it stands when `timeout_s` runs out; woken by Redis pub/sub."""
        deadline = time.monotonic() + timeout_s
        # Register before reading, so that an end between the read and the wait still wakes us; one read in all.
        event = self.completions.register(job_id)
        try:
            job = self.get(job_id)
            while job is not None and not job.status.is_terminal():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    break
                event.clear()
                job = self.get(job_id)
            return job
        finally:
            self.completions.unregister(job_id, event)

    def requeue_lost(self, queue: str, grace_s: float, now: float | None = None) -> list[str]:
        """Find the queue's jobs whose message was lost and queue them again; returns their ids.

        Workers take messages in order, so a job whose sequence number is below the highest one started, or that
        waits while the queue is empty, should be running within moments. Such a job still queued `grace_s`
        after it was first seen so (long enough for a dead worker's message to come back through its lease) and
        whose message no worker holds has lost it. A job requeued while its message was merely slow to come back
        can run twice; the compare-and-set transitions still store one outcome.
        """
        now = time.time() if now is None else now
        index = queued_index_key(queue)
        started = int(self.redis.get(f"{index}:started") or 0)
        behind = set(self.redis.zrangebyscore(index, "-inf", f"({started}", start=0, num=500))
        if self.redis.llen(queue) == 0:
            behind |= set(self.redis.zrange(index, 0, 499))
        suspects = {job_id: float(first) for job_id, first in self.redis.hgetall(f"{index}:suspects").items()}
        pipe = self.redis.pipeline(transaction=False)
        for job_id in set(suspects) - behind:
            pipe.hdel(f"{index}:suspects", job_id)
        for job_id in behind - set(suspects):
            pipe.hset(f"{index}:suspects", job_id, now)
        pipe.execute()
        requeued = []
        for job_id in sorted(job_id for job_id in behind & set(suspects) if now - suspects[job_id] >= grace_s):
            keys = [job_key(job_id), queue, index, queue_seq_key(queue), KOMBU_UNACKED]
            if self._requeue_lost(keys=keys, args=[job_id, run_job_message(job_id, queue)]):
                requeued.append(job_id)
            self.redis.hdel(f"{index}:suspects", job_id)
        return requeued

    def status_counts(self) -> dict[str, int]:
        """Jobs queued and running now, and jobs ended in each terminal status so far (for metrics)."""
        return {status: int(count) for status, count in self.redis.hgetall(STATUS_COUNTS_KEY).items()}

    def queue_depths(self, queues: list[str]) -> dict[str, int]:
        """How many jobs wait in each queue (not counting those a worker holds)."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return dict(zip(queues, pipe.execute(), strict=True))

    # --- workers -----------------------------------------------------------------------------------------

    def record_worker(self, name: str, fresh: bool = False, **fields: object) -> None:
        """Publish a worker's facts (model, loads, pid, ...) for operators and tests; `fresh` drops those of an
        earlier process of the same name."""
        with self.redis.pipeline() as pipe:
            if fresh:
                pipe.delete(worker_key(name))
            pipe.hset(worker_key(name), mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.execute()

    def count_worker_job(self, name: str, loads: int) -> None:
        """One more job handled by this worker, and how many models its process has loaded so far."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(worker_key(name), "jobs", 1)
        pipe.hset(worker_key(name), "loads", loads)
        pipe.execute()

    def count_worker_batch(self, name: str, stats) -> None:
        """One more batch decoded (worker.decoding.BatchStats): counts, rows, the largest batch, GPU seconds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(worker_key(name), "batches", 1)
        pipe.hincrby(worker_key(name), "batched_jobs", stats.rows)
        pipe.eval(lua.MAX_FIELD, 1, worker_key(name), "largest_batch", stats.rows)
        for field in ("prefill_s", "decode_s", "idle_s"):
            pipe.hincrbyfloat(worker_key(name), field, getattr(stats, field))
        pipe.execute()

    def worker_info(self, name: str) -> dict[str, object]:
        """What a worker has published about itself."""
        raw = self.redis.hgetall(worker_key(name))
        return {key: json.loads(value) for key, value in raw.items()}

    def heartbeat(self, name: str) -> None:
        """The worker is alive now."""
        self.redis.zadd(WORKERS_KEY, {name: time.time()})

    def live_workers(self, within_s: float) -> list[str]:
        """Workers whose last heartbeat is at most `within_s` old."""
        return self.redis.zrangebyscore(WORKERS_KEY, time.time() - within_s, "+inf")


class KeyStore:
    """API keys in Redis: a hash per key, found by the hash of its secret."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, name: str, **limits: float | int | list[str] | None) -> tuple[str, ApiKey]:
        """Make a key with optional limits (and `s3_buckets`); returns its secret (shown once, never stored) and
        its facts."""
        secret = new_secret()
        secret_hash = hash_secret(secret)
        key = ApiKey(id=key_id_of(secret_hash), name=name, created_at=utcnow(),
                     **{k: v for k, v in limits.items() if v is not None})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(api_key_key(secret_hash), mapping={"json": key.model_dump_json()})
        pipe.hset(API_KEY_IDS, key.id, secret_hash)
        pipe.execute()
        return secret, key

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not (the worker reads a job owner's S3 buckets), or None."""
        secret_hash = self.redis.hget(API_KEY_IDS, key_id)
        raw = self.redis.hget(api_key_key(secret_hash), "json") if secret_hash else None
        return ApiKey.model_validate_json(raw) if raw else None

    def lookup(self, secret: str) -> ApiKey | None:
        """The live key with this secret, or None (unknown or revoked)."""
        raw = self.redis.hget(api_key_key(hash_secret(secret)), "json")
        key = ApiKey.model_validate_json(raw) if raw else None
        return key if key is not None and not key.revoked else None

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when there is no such key."""
        secret_hash = self.redis.hget(API_KEY_IDS, key_id)
        key = self.get(key_id)
        if key is None:
            return False
        self.redis.hset(api_key_key(secret_hash), "json", key.model_copy(update={"revoked": True}).model_dump_json())
        return True

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included."""
        hashes = list(self.redis.hgetall(API_KEY_IDS).values())
        raws = [self.redis.hget(api_key_key(h), "json") for h in hashes]
        return sorted((ApiKey.model_validate_json(raw) for raw in raws if raw), key=lambda k: k.created_at)
