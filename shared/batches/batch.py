"""The batch model: its statuses and their legal moves, the request that makes one, and the batch as stored and
shown. Like shared/jobs.py, it loads no Redis, HTTP client or Celery."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.jobs import JobFailure, WebhookSpec
from shared.store.keys import BATCH_ID_PREFIX  # a pure module: the key names, no client

PRIORITIES = ("high", "normal", "low")


class BatchStatus(StrEnum):
    """Where a batch stands. Validating until its first item is admitted; completed, failed or canceled once
    every line is read and every item has ended (canceled at once when asked: no item starts after that)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        """True once the batch has ended (a completed one may still be reopened by a retry)."""
        return self in TERMINAL


TERMINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELED})

# The only legal moves; the Lua scripts of shared/store/batches.py make them. COMPLETED -> IN_PROGRESS is a retry of
# the failed items. A batch fails when it could not read its whole input (or, strict, refused a line).
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELED}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELED}),
    BatchStatus.COMPLETED: frozenset({BatchStatus.IN_PROGRESS}),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.CANCELED: frozenset(),
}


def can_transition(current: BatchStatus, new: BatchStatus) -> bool:
    """Whether a batch in `current` may move to `new`."""
    return new in TRANSITIONS[current]


def sources_of(new: BatchStatus) -> list[BatchStatus]:
    """Every status from which `new` may be reached (what a script's compare-and-set accepts)."""
    return [status for status, targets in TRANSITIONS.items() if new in targets]


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + secrets.token_hex(12)


class Phase(StrEnum):
    """What the batch worker does next with a batch's input."""

    CHECKING = "checking"  # strict: every line is checked before any is admitted
    ADMITTING = "admitting"  # lines become items, a chunk at a time
    RETRYING = "retrying"  # failed items get a new attempt
    DONE = "done"  # every line has been read: the batch ends with its last item


class BatchWebhook(WebhookSpec):
    """Where to POST the batch's end; job.* events in `events` also send every item's own end there."""

    events: list[str] | None = Field(default=None, description="batch.completed, batch.failed, batch.canceled "
                                     "(default: those three); add job.succeeded, job.failed or job.canceled for "
                                     "per-item events (off by default)")


class BatchRequest(BaseModel):
    """The body of POST /v1/batches: exactly one input, and defaults for every item."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_file: str | None = Field(default=None, description="upload://<id> of a JSONL upload (POST /v1/uploads "
                                   "with Content-Type application/jsonl), or s3://bucket/key of a JSONL manifest")
    requests: list[Any] | None = Field(default=None, description="the lines inline, for small batches (each one is "
                                       "checked on its own, as a line of a file)")
    images: str | None = Field(default=None, description="s3://bucket/prefix/: every image under it, one job each "
                               "(give task)")
    task: str | None = Field(default=None, description="every item's task unless its line names one")
    question: str | None = None
    max_new_tokens: int | None = None
    model: str | None = None
    num_crops: int | None = Field(default=None, description="every item's num_crops unless its line sets one "
                                  "(Phi-3-vision models only, 1..16)")
    priority: Literal["high", "normal", "low"] = Field(default="low", description="every item's priority")
    webhook: BatchWebhook | None = None
    strict: bool = Field(default=False, description="refuse the whole batch if any line is refused")


class BatchInput(BaseModel):
    """Where the batch's lines come from."""

    kind: Literal["requests", "upload", "s3", "s3_prefix"]
    uri: str | None = Field(default=None, description="the s3:// manifest or prefix; the upload:// it took over")


class ItemDefaults(BaseModel):
    """What every item gets unless its line says otherwise."""

    task: str | None = None
    question: str | None = None
    max_new_tokens: int | None = None
    model: str | None = None
    num_crops: int | None = None


class BatchSpec(BaseModel):
    """The batch's request once checked: stored with it, never changed."""

    input: BatchInput
    defaults: ItemDefaults
    priority: str = "low"
    strict: bool = False
    webhook: BatchWebhook | None = None

    def item_events(self) -> list[str]:
        """The job events the items send to the batch's webhook (and to the key's endpoints): none by default."""
        events = (self.webhook.events or []) if self.webhook else []
        return [event for event in events if event.startswith("job.")]


class BatchCounts(BaseModel):
    """How far the batch is: lines read, refused and admitted, and its items by job status (moved by the same
    transitions that end the jobs)."""

    lines: int = Field(description="input lines (or objects under the prefix) read so far")
    refused: int = Field(description="lines refused (see the errors file)")
    items: int = Field(description="lines admitted as jobs")
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.canceled


STATUS_FIELDS = ("queued", "running", "succeeded", "failed", "canceled")


class Batch(BaseModel):
    """A batch as stored and as the API shows it."""

    id: str
    status: BatchStatus
    owner: str | None = Field(default=None, exclude=True)
    input: BatchInput
    defaults: ItemDefaults
    priority: str
    strict: bool
    webhook: BatchWebhook | None = None
    counts: BatchCounts
    input_done: bool = Field(description="every line has been read")
    attempt: int = Field(description="1, then one more for each retry of the failed items")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    canceled_at: datetime | None = None
    eta_s: float | None = Field(default=None, description="seconds until every item has ended, estimated from the "
                                "rate so far")
    error: JobFailure | None = Field(default=None, description="why the batch failed (input unreadable, ...)")
    output_file: str | None = Field(default=None, description="the results in S3 (VISIONQ_RESULTS_S3_URI)")
    errors_file: str | None = Field(default=None, description="the refused lines in S3")

    def public(self) -> dict:
        """The JSON-ready view that GET /v1/batches/<id> returns."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_hash(cls, raw: dict[str, str], items: int, refused: int, now: float | None = None) -> Batch:
        """The batch from its Redis hash, with its item and refusal counts (kept beside it)."""
        spec = BatchSpec.model_validate_json(raw["spec"])
        counts = BatchCounts(lines=int(raw.get("lines", 0)), refused=refused, items=items,
                             **{name: max(0, int(raw.get(name, 0))) for name in STATUS_FIELDS})
        status = BatchStatus(raw["status"])
        input_done = raw.get("phase") == Phase.DONE
        return cls(
            id=raw["id"], status=status, owner=raw.get("owner"), input=spec.input, defaults=spec.defaults,
            priority=spec.priority, strict=spec.strict, webhook=spec.webhook, counts=counts, input_done=input_done,
            attempt=int(raw.get("attempt", 1)), created_at=_time(raw["created_at"]),
            started_at=_time(raw.get("started_at")), finished_at=_time(raw.get("finished_at")),
            canceled_at=_time(raw.get("canceled_at")),
            eta_s=eta_s(counts, raw, now if now is not None else time.time()),
            error=JobFailure.model_validate_json(raw["error"]) if raw.get("error") else None,
            output_file=raw.get("output_file"), errors_file=raw.get("errors_file"))


def _time(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


def eta_s(counts: BatchCounts, raw: dict[str, str], now: float) -> float | None:
    """Seconds until the last item ends, at the rate items have ended since this attempt started (a retry counts
    only its own); the items still to come are estimated from the share of the input read. None before any item
    of the attempt has ended."""
    started = float(raw.get("attempt_started_at") or 0)
    ended = counts.ended - int(raw.get("ended_base", 0))
    if raw.get("finished_at") or not started or ended <= 0 or now <= started:
        return None
    expected = counts.items
    offset, size = int(raw.get("offset", 0)), int(raw.get("input_bytes", 0))
    if raw.get("phase") != Phase.DONE and 0 < offset < size:
        expected = round(counts.items * size / offset)
    return round(max(0, expected - counts.ended) / (ended / (now - started)), 1)


def spec_json(spec: BatchSpec) -> str:
    return spec.model_dump_json(exclude_none=True)


def error_json(code: str, message: str) -> str:
    return json.dumps({"code": code, "message": message})
