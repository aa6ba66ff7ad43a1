"""Jobs in Redis: a hash per job with a TTL, created with its queue message and changed only by the transition
script (a compare-and-set that also moves the counts, frees the owner's slot and writes the webhook outbox)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from shared.config import Settings
from shared.errors import DeadlineExceeded
from shared.jobs import PRIORITY_RANKS, Job, JobFailure, JobResult, JobStatus, sources_of, utcnow
from shared.routing import webhook_queue as webhook_queue_of
from shared.store import scripts
from shared.store.broker import DISPATCH_WEBHOOKS_TASK, run_job_message, task_message
from shared.store.completions import CompletionListener
from shared.store.keys import (
    JOB_DONE_PATTERN,
    PREFIX,
    STATUS_COUNTS_KEY,
    batch_items_key,
    batch_key,
    batch_order_key,
    deliveries_key,
    delivery_key,
    endpoints_key,
    idempotency_key,
    job_done_channel,
    job_id_from_done_channel,
    job_key,
    owner_active_key,
    owner_jobs_key,
    queue_seq_key,
    queued_index_key,
    rate_key,
    webhook_queue,
    webhooks_due_key,
)
from shared.store.queues import TEMPLATES, Place, QueueFigures
from shared.store.rates import UNLIMITED, Charge

# Templates of the keys the transition script learns only as it runs (keys.py explains the placeholders).
OWNER_ACTIVE_TEMPLATE = owner_active_key("{owner}")
ENDPOINTS_TEMPLATE = endpoints_key("{owner}")


@dataclass(frozen=True)
class ItemOf:
    """The batch a job being created is an item of, and its line there (shared/store/lua/batch_item.lua)."""

    batch_id: str
    line: int
    quiet: bool = True  # the owner's endpoints get none of its events (per-item events are off by default)
    retry_of: str | None = None  # the failed job this is a new attempt of


@dataclass(frozen=True)
class Created:
    """The outcome of JobStore.create: "created", "existing" (an idempotent repeat), "queue_full" or
    "rate_limited"; for a batch item also "duplicate" (its custom_id is another line's) or "batch_closed"."""

    outcome: str
    job_id: str
    same_request: bool = True  # for "existing": whether the earlier request had the same body
    retry_after_s: float = 0.0  # for "rate_limited"
    detail: str = ""  # for "duplicate": the line that holds the custom_id; for "batch_closed": the batch's status


@dataclass(frozen=True)
class Transition:
    """The outcome of a compare-and-set: whether it applied, and the status the job had before."""

    applied: bool
    previous: JobStatus | None
    attempts: int


def _created(reply: list[str], job_id: str, request_hash: str) -> Created:
    outcome, detail = reply
    if outcome == "existing":
        existing_id, earlier_hash = detail.split(" ", 1)
        return Created("existing", existing_id, earlier_hash == request_hash)
    if outcome == "rate_limited":
        return Created(outcome, "", retry_after_s=float(detail))
    return Created(outcome, job_id if outcome == "created" else "", detail=detail)


class JobStore:
    """Jobs as Redis hashes with a TTL; status changes only through the transition script."""

    def __init__(self, client: redis.Redis, ttl_s: int, idempotency_ttl_s: int = 24 * 3600,
                 webhook_queue: str = webhook_queue(PREFIX), window: int = 16, figures_ttl_s: float = 1.0):
        self.redis = client
        self.figures = QueueFigures(client, figures_ttl_s)  # what a queued job's place says of its queue's workers
        self.window = window  # how many messages a queue's list may hold (shared/store/queues.py)
        self.ttl_s = ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.webhook_queue = webhook_queue  # where a job's end puts its webhook dispatch message
        self._transition = scripts.register(client, "transition")
        self._create = scripts.register(client, "create_job")
        self._charged_get = scripts.register(client, "charged_get")
        self._placed_get = scripts.register(client, "placed_get")
        # Its thread starts on the first wait, so workers, which never wait, never run one.
        self.completions = CompletionListener(client, JOB_DONE_PATTERN, job_id_from_done_channel)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> JobStore:
        """The store with the lifetimes and webhook queue these settings give."""
        return cls(client, settings.result_ttl_s, settings.idempotency_ttl_s, webhook_queue_of(settings),
                   settings.broker_window, settings.queue_figures_cache_s)

    def create(self, job: Job, queue: str, *, max_active: int = 2**62, idempotency: str | None = None,
               request_hash: str = "", charge: Charge = UNLIMITED) -> Created:
        """Take the request from the owner's bucket, then store a new job and queue it (in its key's line, and on
        the list when it has room: shared/store/queues.py), all or nothing; or find
        the job an earlier request with the same idempotency key made; or refuse when the owner already has
        `max_active` jobs queued or running. One round trip."""
        keys, args = self._create_call(job, queue, max_active, idempotency, request_hash, charge)
        return _created(self._create(keys=keys, args=args), job.id, request_hash)

    def create_items(self, items: list[tuple[Job, str, ItemOf]], max_active: int) -> list[Created]:
        """Create batch items the way `create` makes any job (same script, same queue), each admitted to its
        batch in the same step (idempotent by custom_id); one round trip for them all."""
        pipe = self.redis.pipeline(transaction=False)
        for job, queue, item in items:
            keys, args = self._create_call(job, queue, max_active, None, "", UNLIMITED, item)
            self._create(keys=keys, args=args, client=pipe)
        return [_created(reply, job.id, "") for reply, (job, _, _) in zip(pipe.execute(), items, strict=True)]

    def _create_call(self, job: Job, queue: str, max_active: int, idempotency: str | None, request_hash: str,
                     charge: Charge, item: ItemOf | None = None) -> tuple[list[str], list]:
        owner = job.owner or ""
        keys = [job_key(job.id), queue, owner_jobs_key(owner), owner_active_key(owner),
                idempotency_key(owner, idempotency) if idempotency else "", rate_key(charge.owner),
                STATUS_COUNTS_KEY, queued_index_key(queue), queue_seq_key(queue)]
        fields = job.to_hash()
        if item is not None:
            keys += [batch_key(item.batch_id), batch_items_key(item.batch_id), batch_order_key(item.batch_id)]
            fields |= {"batch_key": batch_key(item.batch_id), "batch_line": str(item.line),
                       "quiet": "1" if item.quiet else "0", **({"retry_of": item.retry_of} if item.retry_of else {})}
        deadline = job.start_deadline()
        args = [self.ttl_s, max_active, job.created_at.timestamp(), job.id, request_hash, self.idempotency_ttl_s,
                run_job_message(job.id, queue), charge.rate_per_s, charge.burst, TEMPLATES,
                PRIORITY_RANKS.get(job.priority or "normal", 1), self.window,
                repr(deadline) if deadline is not None else "", *(value for pair in fields.items() for value in pair)]
        return keys, args

    def get(self, job_id: str) -> Job | None:
        """The job, or None when it does not exist or has expired."""
        raw = self.redis.hgetall(job_key(job_id))
        return Job.from_hash(raw) if raw else None

    def charged_get(self, job_id: str, charge: Charge) -> tuple[float, Job | None]:
        """Take the request from the owner's bucket and read the job, with where it stands when it is queued, in
        one round trip: (seconds to wait before a request may go ahead, 0 when this one may; the job)."""
        wait_s, flat, place = self._charged_get(keys=[rate_key(charge.owner), job_key(job_id)],
                                                args=[charge.rate_per_s, charge.burst, job_id, TEMPLATES])
        return float(wait_s), self._placed(flat, place)

    def placed_get(self, job_id: str) -> Job | None:
        """The job, with where it stands when it is queued (as charged_get reads it, without the charge)."""
        return self._placed(*self._placed_get(keys=[job_key(job_id)], args=[job_id, TEMPLATES]))

    def _placed(self, flat: list[str], place: list) -> Job | None:
        """A job from read_job.lua's reply: its hash's fields, and its place (with its queue's figures) when it
        is queued."""
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        if not raw:
            return None
        where = Place.from_reply(place, self.figures.of(raw["queue"])).public() if place else None
        return Job.from_hash(raw, place=where)

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
            jobs = self.get_many([job_id for job_id, _ in batch])
            for (_job_id, score), job in zip(batch, jobs, strict=True):
                scanned += 1
                upper = f"({score}"
                if job is not None and (status is None or job.status == status):
                    page.append(job)
                    if len(page) == limit:
                        return page, score
        return page, float(upper[1:])

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """These jobs (None for one that does not exist), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [Job.from_hash(raw) if raw else None for raw in pipe.execute()]

    def mark_running(self, job_id: str, worker: str) -> Transition:
        """Queued (or redelivered while running) -> running; counts an attempt."""
        fields = {"started_at": utcnow().isoformat(), "worker": worker}
        return self._apply(job_id, JobStatus.RUNNING, fields, count_attempt=True)

    def mark_succeeded(self, job_id: str, result: JobResult) -> Transition:
        """Running -> succeeded, with the result."""
        return self._finish(job_id, JobStatus.SUCCEEDED, {"result": result.model_dump_json()})

    def mark_failed(self, job_id: str, failure: JobFailure, only_queued: bool = False) -> Transition:
        """Queued or running -> failed, with the reason (`only_queued`: only a job that has not started)."""
        fields = {"error": failure.model_dump_json(), "finished_at": utcnow().isoformat()}
        return self._apply(job_id, JobStatus.FAILED, fields, sources=[JobStatus.QUEUED] if only_queued else None)

    def fail_past_deadline(self, job_id: str) -> Transition:
        """Queued -> failed deadline_exceeded: the job did not start within its start_within_s (one that started
        or ended meanwhile is left as it is)."""
        failure = DeadlineExceeded("the job did not start within its start_within_s")
        return self.mark_failed(job_id, JobFailure(code=failure.code, message=failure.message), only_queued=True)

    def mark_canceled(self, job_id: str, failure: JobFailure) -> Transition:
        """Queued or running -> canceled, with who canceled and why."""
        return self._finish(job_id, JobStatus.CANCELED, {"error": failure.model_dump_json()})

    def _finish(self, job_id: str, status: JobStatus, fields: dict[str, str]) -> Transition:
        fields["finished_at"] = utcnow().isoformat()
        return self._apply(job_id, status, fields)

    def _apply(self, job_id: str, status: JobStatus, fields: dict[str, str], count_attempt: bool = False,
               sources: list[JobStatus] | None = None) -> Transition:
        terminal = status.is_terminal()
        dispatch = task_message(DISPATCH_WEBHOOKS_TASK, [], self.webhook_queue) if terminal else ""
        keys = [job_key(job_id), webhooks_due_key(self.webhook_queue), self.webhook_queue, STATUS_COUNTS_KEY,
                deliveries_key(job_id)]
        args = [status.value, " ".join(sources or sources_of(status)), job_done_channel(job_id), self.ttl_s,
                "1" if terminal else "0", "1" if count_attempt else "0", job_id, OWNER_ACTIVE_TEMPLATE,
                ENDPOINTS_TEMPLATE, delivery_key(job_id, "{delivery}"), TEMPLATES, self.window, dispatch,
                *(item for pair in fields.items() for item in pair)]
        applied, previous, attempts = self._transition(keys=keys, args=args)
        return Transition(bool(applied), JobStatus(previous) if previous else None, int(attempts))

    def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is terminal, or as it stands when `timeout_s` runs out (a queued one with where it
        stands, as a plain read gives it); woken by Redis pub/sub."""
        deadline = time.monotonic() + timeout_s
        # Register before reading, so that an end between the read and the wait still wakes us.
        event = self.completions.register(job_id)
        try:
            job = self.placed_get(job_id)
            while job is not None and not job.status.is_terminal():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    break
                event.clear()
                job = self.placed_get(job_id)
            if job is not None and job.status == JobStatus.QUEUED:
                job = self.placed_get(job_id) or job  # where it stands now, not when the wait began
            return job
        finally:
            self.completions.unregister(job_id, event)

    def status_counts(self) -> dict[str, int]:
        """Jobs queued and running now, and jobs ended in each terminal status so far (for metrics)."""
        return {status: int(count) for status, count in self.redis.hgetall(STATUS_COUNTS_KEY).items()}
