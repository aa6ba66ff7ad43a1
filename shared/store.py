"""Every Redis read and write of visionq, and every key name: the job store and its atomic state machine."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from shared.completions import CompletionListener
from shared.config import Settings
from shared.jobs import Job, JobFailure, JobResult, JobStatus, sources_of, utcnow
from shared.queue import run_job_message

PREFIX = "visionq"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_done_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


JOB_DONE_PATTERN = job_done_channel("*")


def job_id_from_done_channel(channel: str) -> str:
    return channel[len(f"{PREFIX}:job:"):-len(":done")]


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def connect(settings: Settings) -> redis.Redis:
    """The Redis client every visionq process uses (strings in, strings out)."""
    return redis.Redis.from_url(settings.broker_url, decode_responses=True, health_check_interval=30)


# Compare-and-set of the status, in one script so that two writers can never both win:
# KEYS[1] job hash; ARGV: new status, allowed current statuses (space-separated), done channel, ttl seconds,
# "1" when the new status is terminal, "1" to count an attempt, then field/value pairs to write.
# Returns {applied (0/1), status before the call ("" when the job does not exist), attempts}.
_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, '', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local allowed = false
for status in string.gmatch(ARGV[2], '%S+') do
  if status == current then allowed = true end
end
if not allowed then return {0, current, attempts} end
if ARGV[6] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] == '1' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return {1, current, attempts}
"""


@dataclass(frozen=True)
class Transition:
    """The outcome of a compare-and-set: whether it applied, and the status the job had before."""

    applied: bool
    previous: JobStatus | None
    attempts: int


class JobStore:
    """Jobs as Redis hashes with a TTL; status changes only through the transition script."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)
        # Its thread starts on the first wait, so workers, which never wait, never run one.
        self.completions = CompletionListener(client, JOB_DONE_PATTERN, job_id_from_done_channel)

    def create(self, job: Job, queue: str) -> None:
        """Write a new job with its expiry and put it on `queue`, in one transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_key(job.id), mapping=job.to_hash())
        pipe.expire(job_key(job.id), self.ttl_s)
        pipe.lpush(queue, run_job_message(job.id, queue))  # kombu's Redis transport: a list named as the queue
        pipe.execute()

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it does not exist or has expired."""
        raw = self.redis.hgetall(job_key(job_id))
        return Job.from_hash(raw) if raw else None

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
        args = [status.value, allowed, job_done_channel(job_id), self.ttl_s,
                "1" if status.is_terminal() else "0", "1" if count_attempt else "0", *flat]
        applied, previous, attempts = self._transition(keys=[job_key(job_id)], args=args)
        return Transition(bool(applied), JobStatus(previous) if previous else None, int(attempts))

    def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is terminal, or as it stands when `timeout_s` runs out; woken by Redis pub/sub."""
        deadline = time.monotonic() + timeout_s
        job = self.get(job_id)
        if job is None or job.status.is_terminal():
            return job  # the common poll of a finished job costs one read
        event = self.completions.register(job_id)
        try:
            job = self.get(job_id)  # again, now that an end can no longer slip by unseen
            while job is not None and not job.status.is_terminal():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    break
                event.clear()
                job = self.get(job_id)
            return job
        finally:
            self.completions.unregister(job_id, event)

    # --- workers -----------------------------------------------------------------------------------------

    def record_worker(self, name: str, **fields: object) -> None:
        """Publish a worker's facts (model, loads, pid, ...) for operators and tests."""
        self.redis.hset(worker_key(name), mapping={k: json.dumps(v) for k, v in fields.items()})

    def count_worker_job(self, name: str, loads: int) -> None:
        """One more job handled by this worker, and how many models its process has loaded so far."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(worker_key(name), "jobs", 1)
        pipe.hset(worker_key(name), "loads", loads)
        pipe.execute()

    def worker_info(self, name: str) -> dict[str, object]:
        """What a worker has published about itself."""
        raw = self.redis.hgetall(worker_key(name))
        return {key: json.loads(value) for key, value in raw.items()}
