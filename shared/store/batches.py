"""Batches in Redis: a hash per batch (its spec, status, progress and counts by job status), its items (custom_id
-> line and current job), their order, its refused lines, and its input when that lives in Redis.

The counts by job status are moved by the job scripts themselves (lua/batch_item.lua, called by create_job.lua
and transition.lua), so they change in the same step as the jobs and are never recounted. The batch's own moves
are scripts too: create_batch, finish_input, cancel_batch, reopen_batch and notify_batch. The batch hash names
its finish message and queue, since the transition that ends its last item learns the batch only from the job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from shared.batches.batch import Batch, BatchSpec, BatchStatus, Phase, sources_of, spec_json
from shared.config import Settings
from shared.routing import batch_queue, webhook_queue
from shared.store import scripts
from shared.store.broker import (
    BATCH_CANCEL_TASK,
    BATCH_FINISH_TASK,
    BATCH_STEP_TASK,
    DISPATCH_WEBHOOKS_TASK,
    task_message,
)
from shared.store.keys import (
    batch_errors_key,
    batch_idempotency_key,
    batch_input_key,
    batch_items_key,
    batch_key,
    batch_lock_key,
    batch_order_key,
    batch_seen_key,
    batches_due_key,
    batches_open_key,
    deliveries_key,
    delivery_key,
    endpoints_key,
    job_key,
    owner_batches_key,
    upload_chunks_key,
    upload_key,
    webhooks_due_key,
)

MAX_ERROR_MESSAGE = 300  # characters of a refusal's message kept in the errors file


@dataclass(frozen=True)
class NewBatch:
    """A batch about to be stored: made by the API from a checked request."""

    id: str
    owner: str
    spec: BatchSpec
    created_at: float


@dataclass(frozen=True)
class BatchCreated:
    """The outcome of BatchStore.create: "created", "existing" (an idempotent repeat) or "input_not_found"."""

    outcome: str
    batch_id: str
    same_request: bool = True


@dataclass(frozen=True)
class Refusal:
    """A line the batch refused: its number, a stable code and a message (and its custom_id when it had one)."""

    line: int
    code: str
    message: str
    custom_id: str | None = None

    def to_json(self) -> str:
        body = {"line": self.line, **({"custom_id": self.custom_id} if self.custom_id is not None else {}),
                "error": {"code": self.code, "message": self.message[:MAX_ERROR_MESSAGE]}}
        return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True)
class Item:
    """One item of a batch: its custom_id, the line that made it and the job of its current attempt."""

    custom_id: str
    line: int
    job_id: str


class BatchStore:
    """Batches on one batch queue; `binary` reads their input as bytes."""

    def __init__(self, client: redis.Redis, binary: redis.Redis, ttl_s: int, idempotency_ttl_s: int, queue: str,
                 webhook_queue: str):
        self.redis, self.binary = client, binary
        self.ttl_s, self.idempotency_ttl_s = ttl_s, idempotency_ttl_s
        self.queue, self.webhook_queue = queue, webhook_queue
        self.due_key = batches_due_key(queue)
        self.open_key = batches_open_key(queue)
        self._create = scripts.register(client, "create_batch")
        self._finish_input = scripts.register(client, "finish_input")
        self._cancel = scripts.register(client, "cancel_batch")
        self._reopen = scripts.register(client, "reopen_batch")
        self._notify = scripts.register(client, "notify_batch")
        self._take_due = scripts.register(client, "take_due")

    @classmethod
    def from_settings(cls, client: redis.Redis, binary: redis.Redis, settings: Settings) -> BatchStore:
        """The store with the lifetimes and queues these settings give."""
        return cls(client, binary, settings.result_ttl_s, settings.idempotency_ttl_s, batch_queue(settings),
                   webhook_queue(settings))

    # --- messages ---------------------------------------------------------------------------------------------

    def step_message(self, batch_id: str) -> str:
        return task_message(BATCH_STEP_TASK, [batch_id], self.queue)

    def finish_message(self, batch_id: str, attempt: int) -> str:
        return task_message(BATCH_FINISH_TASK, [batch_id, str(attempt)], self.queue)

    # --- the batch --------------------------------------------------------------------------------------------

    def create(self, batch: NewBatch, idempotency: str | None, request_hash: str, upload_id: str | None = None,
               chunks: list[bytes] | None = None) -> BatchCreated:
        """Store the batch and queue its first step, all or nothing; or find the batch an earlier request with the
        same idempotency key made. With `upload_id`, the batch takes that JSONL upload over as its input."""
        fields = {"id": batch.id, "owner": batch.owner, "status": BatchStatus.VALIDATING,
                  "phase": Phase.CHECKING if batch.spec.strict else Phase.ADMITTING, "created_at": batch.created_at,
                  "attempt": 1, "spec": spec_json(batch.spec), "lines": 0, "offset": 0, "cursor": "",
                  "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0,
                  "input_bytes": sum(len(chunk) for chunk in chunks or []),
                  "finish_queue": self.queue, "finish_message": self.finish_message(batch.id, 1)}
        if batch.spec.webhook is not None:  # read by the outbox (lua/outbox.lua) when the batch's end is told
            fields["webhook"] = batch.spec.webhook.model_dump_json()
        keys = [batch_key(batch.id), batch_idempotency_key(batch.owner, idempotency) if idempotency else "",
                owner_batches_key(batch.owner), self.queue, upload_key(upload_id) if upload_id else "",
                upload_chunks_key(upload_id) if upload_id else "", batch_input_key(batch.id), self.open_key]
        args = [batch.id, request_hash, self.idempotency_ttl_s, batch.created_at, self.step_message(batch.id),
                batch.owner, json.dumps({name: str(value) for name, value in fields.items()}),
                time.time() + self.keep_every_s, *(chunks or [])]
        outcome, detail = self._create(keys=keys, args=args)
        if outcome == "existing":
            batch_id, earlier_hash = detail.split(" ", 1)
            return BatchCreated(outcome, batch_id, earlier_hash == request_hash)
        return BatchCreated(outcome, batch.id if outcome == "created" else "")

    def get(self, batch_id: str) -> Batch | None:
        """The batch as the API shows it, or None when it does not exist (or has expired)."""
        raw, items, refused = self._read(batch_id)
        return Batch.from_hash(raw, items, refused) if raw else None

    def state(self, batch_id: str) -> dict[str, str]:
        """The batch's stored fields as they are (the batch worker's view: phase, cursor, spec, ...)."""
        return self.redis.hgetall(batch_key(batch_id))

    def _read(self, batch_id: str) -> tuple[dict[str, str], int, int]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.hlen(batch_items_key(batch_id))
        pipe.zcard(batch_errors_key(batch_id))
        raw, items, refused = pipe.execute()
        return raw, items, refused

    def list(self, owner: str, status: BatchStatus | None, limit: int, before: float | None,
             scan_limit: int = 1000) -> tuple[list[Batch], float | None]:
        """The owner's batches, newest first, created before `before`, optionally of one status; the page and
        the timestamp to continue from (None at the end). Entries whose batch has expired are dropped."""
        index, page, scanned = owner_batches_key(owner), [], 0
        upper = f"({before}" if before is not None else "+inf"
        while len(page) < limit and scanned < scan_limit:
            entries = self.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=limit * 2, withscores=True)
            if not entries:
                return page, None
            for (batch_id, score), batch in zip(entries, self._get_many([b for b, _ in entries]), strict=True):
                scanned, upper = scanned + 1, f"({score}"
                if batch is None:
                    self.redis.zrem(index, batch_id)
                elif status is None or batch.status == status:
                    page.append(batch)
                    if len(page) == limit:
                        return page, score
        return page, float(upper[1:])

    def _get_many(self, batch_ids: list[str]) -> list[Batch | None]:
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hgetall(batch_key(batch_id))
            pipe.hlen(batch_items_key(batch_id))
            pipe.zcard(batch_errors_key(batch_id))
        replies = pipe.execute()
        return [Batch.from_hash(raw, items, refused) if raw else None
                for raw, items, refused in zip(replies[::3], replies[1::3], replies[2::3], strict=True)]

    # --- the batch's own moves --------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> tuple[bool, str]:
        """Cancel a batch that has not ended: (applied, the status before; "" when there is no such batch)."""
        allowed = " ".join(sources_of(BatchStatus.CANCELED))
        message = task_message(BATCH_CANCEL_TASK, [batch_id], self.queue)
        applied, previous = self._cancel(keys=[batch_key(batch_id), self.queue], args=[allowed, message])
        return bool(applied), previous

    def reopen(self, batch_id: str) -> str:
        """Start a new attempt for the failed items of a completed batch: "" when it started, else why not
        ("missing", "nothing_failed", or the status that forbids it)."""
        attempt = int(self.redis.hget(batch_key(batch_id), "attempt") or 1) + 1
        keys = [batch_key(batch_id), self.queue, self.open_key, batch_items_key(batch_id), batch_order_key(batch_id),
                batch_errors_key(batch_id), batch_input_key(batch_id)]
        args = [self.step_message(batch_id), self.finish_message(batch_id, attempt), time.time() + self.keep_every_s]
        applied, why = self._reopen(keys=keys, args=args)
        return "" if applied else why

    def finish_input(self, batch_id: str, error: str = "") -> bool:
        """Every line has been read (or reading stopped, with `error` as JSON): the batch ends with its last item,
        or now if none is left. False when its input had ended already."""
        return bool(self._finish_input(keys=[batch_key(batch_id)], args=[error]))

    def notify(self, batch_id: str, attempt: int, read: str, final: BatchStatus, finished_at: float,
               body: str) -> int:
        """Set the final status of the batch's `attempt` and write the webhook outbox of its end, with the event's
        body, once: 1 when told, 0 when not (told already, another attempt), -1 when its status is no longer
        `read` (a cancel came in between)."""
        event_id = f"msg_{batch_id}" if attempt == 1 else f"msg_{batch_id}_{attempt}"
        keys = [batch_key(batch_id), webhooks_due_key(self.webhook_queue), self.webhook_queue,
                deliveries_key(batch_id)]
        args = [batch_id, attempt, event_id, delivery_key(batch_id, "{delivery}"), endpoints_key("{owner}"),
                task_message(DISPATCH_WEBHOOKS_TASK, [], self.webhook_queue), self.ttl_s, body, read, final,
                finished_at]
        return int(self._notify(keys=keys, args=args))

    def record_outputs(self, batch_id: str, output_file: str | None, errors_file: str | None) -> None:
        fields = {name: value for name, value in (("output_file", output_file), ("errors_file", errors_file))
                  if value}
        if fields:
            self.redis.hset(batch_key(batch_id), mapping=fields)

    @property
    def keep_every_s(self) -> float:
        """How often the items of a batch still running have their lifetimes renewed."""
        return self.ttl_s / 4

    def take_open(self, limit: int = 20) -> list[str]:
        """Batches still running whose items' lifetimes are due for renewal (each put off until the next time)."""
        return self._take_due(keys=[self.open_key], args=[limit, self.keep_every_s])

    def close(self, batch_id: str) -> None:
        """The batch has ended: its lifetime is its own now."""
        self.redis.zrem(self.open_key, batch_id)

    def keep(self, job_ids: list[str]) -> None:
        """Make these jobs live at least RESULT_TTL_S from now (never shorter than they would)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.expire(job_key(job_id), self.ttl_s, gt=True)
        pipe.execute()

    def expire(self, batch_id: str, job_ids: list[str]) -> None:
        """Keep the ended batch, its indexes and these items' jobs RESULT_TTL_S from now."""
        pipe = self.redis.pipeline(transaction=False)
        for key in (batch_key(batch_id), batch_items_key(batch_id), batch_order_key(batch_id),
                    batch_errors_key(batch_id), batch_input_key(batch_id)):
            pipe.expire(key, self.ttl_s)
        pipe.delete(batch_seen_key(batch_id))
        for job_id in job_ids:
            pipe.expire(job_key(job_id), self.ttl_s)
        pipe.execute()

    # --- the batch worker's step ------------------------------------------------------------------------------

    def lock(self, batch_id: str, holder: str, lease_s: float) -> bool:
        """Take the batch's step for `lease_s` (one thread at a time reads and admits its lines)."""
        return bool(self.redis.set(batch_lock_key(batch_id), holder, nx=True, px=int(lease_s * 1000)))

    def unlock(self, batch_id: str, holder: str) -> None:
        key = batch_lock_key(batch_id)
        if self.redis.get(key) == holder:
            self.redis.delete(key)

    def save_progress(self, batch_id: str, lines: int, offset: int, cursor: str) -> None:
        """Where reading stopped: the next step starts there (lines already admitted are found again by
        custom_id, so a step that ran twice admits nothing twice)."""
        self.redis.hset(batch_key(batch_id), mapping={"lines": lines, "offset": offset, "cursor": cursor})

    def mark_uploads_kept(self, batch_id: str) -> None:
        self.redis.hset(batch_key(batch_id), "uploads_kept", 1)

    def count_read_error(self, batch_id: str) -> int:
        """One more failed read of the batch's input; how many so far."""
        return self.redis.hincrby(batch_key(batch_id), "read_errors", 1)

    def set_phase(self, batch_id: str, phase: Phase) -> None:
        self.redis.hset(batch_key(batch_id), mapping={"phase": phase, "lines": 0, "offset": 0, "cursor": ""})

    def refuse(self, batch_id: str, refusals: list[Refusal]) -> None:
        """Add refused lines to the errors file (scored by line: adding one again changes nothing)."""
        if refusals:
            self.redis.zadd(batch_errors_key(batch_id), {r.to_json(): r.line for r in refusals})

    def claim_ids(self, batch_id: str, ids: list[tuple[str, int]]) -> list[int | None]:
        """Strict checking: record each (custom_id, line); for each, the other line that had it, or None."""
        pipe = self.redis.pipeline(transaction=False)
        for custom_id, line in ids:
            pipe.hsetnx(batch_seen_key(batch_id), custom_id, line)
        pipe.execute()
        held = self.redis.hmget(batch_seen_key(batch_id), [custom_id for custom_id, _ in ids]) if ids else []
        return [int(h) if h is not None and int(h) != line else None
                for h, (_, line) in zip(held, ids, strict=True)]

    def defer(self, batch_id: str, delay_s: float) -> None:
        """Run the batch's next step in `delay_s` (it waits for room under its key's cap, or after an error)."""
        self.redis.zadd(self.due_key, {batch_id: time.time() + delay_s})

    def undefer(self, batch_id: str) -> None:
        self.redis.zrem(self.due_key, batch_id)

    def take_due(self, lease_s: float, limit: int = 100) -> list[str]:
        """Batches whose deferred step has come due, each put off by `lease_s` so that the next poll skips it."""
        return self._take_due(keys=[self.due_key], args=[limit, lease_s])

    def enqueue_steps(self, batch_ids: list[str], task: str = BATCH_STEP_TASK) -> None:
        """Queue the step (or another task) of each of these batches."""
        if batch_ids:
            self.redis.lpush(self.queue, *(task_message(task, [batch_id], self.queue) for batch_id in batch_ids))

    # --- reading a batch --------------------------------------------------------------------------------------

    def input_chunk(self, batch_id: str, index: int) -> bytes | None:
        """One chunk of the batch's input held in Redis (None past the end)."""
        return self.binary.lindex(batch_input_key(batch_id), index)

    def input_chunks(self, batch_id: str) -> int:
        return self.binary.llen(batch_input_key(batch_id))

    def custom_ids(self, batch_id: str, start: int, count: int) -> list[str]:
        """custom_ids in the order their lines were admitted, from position `start`."""
        return self.redis.lrange(batch_order_key(batch_id), start, start + count - 1)

    def items(self, batch_id: str, custom_ids: list[str]) -> list[Item | None]:
        """The items with these custom_ids (None for one that has none)."""
        held = self.redis.hmget(batch_items_key(batch_id), custom_ids) if custom_ids else []
        found: list[Item | None] = []
        for custom_id, value in zip(custom_ids, held, strict=True):
            line, _, job_id = (value or "").partition(" ")
            found.append(Item(custom_id, int(line), job_id) if value else None)
        return found

    def refusals(self, batch_id: str, start: int, count: int) -> list[str]:
        """Refused lines as JSON, in line order, from position `start`."""
        return self.redis.zrange(batch_errors_key(batch_id), start, start + count - 1)

    def job_fields(self, job_ids: list[str], fields: tuple[str, ...]) -> list[dict[str, str | None]]:
        """These fields of these jobs, in one round trip (an expired job gives None values)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(job_key(job_id), list(fields))
        return [dict(zip(fields, values, strict=True)) for values in pipe.execute()]
