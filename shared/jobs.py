"""The one job model that the API, the store and the worker share, and the state machine of its status."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class JobStatus(StrEnum):
    """Where a job stands; a terminal status is written once and never changes."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        """True once the job has ended."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# The only legal moves. RUNNING -> RUNNING is a redelivery: the worker that ran the job died and another
# attempt starts (bounded by settings.max_attempts). Terminal states have no way out.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset({JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


# A job's priority orders it within its key's queued jobs (shared/store/queues.py): rank 0 goes first.
PRIORITY_RANKS = {"high": 0, "normal": 1, "low": 2}
# Phi-3-vision's HD transform cuts an image into at most this many crops (its checkpoints use 4 or 16).
MAX_NUM_CROPS = 16


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    """Whether a job in `current` may move to `new`."""
    return new in TRANSITIONS[current]


def sources_of(new: JobStatus) -> list[JobStatus]:
    """Every status from which `new` may be reached (what the store's compare-and-set accepts)."""
    return [status for status, targets in TRANSITIONS.items() if new in targets]


def utcnow() -> datetime:
    """Now, timezone-aware."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A random, URL-safe job id."""
    return uuid.uuid4().hex


class TokenCounts(BaseModel):
    prompt: int
    completion: int


class Timings(BaseModel):
    queue_ms: float
    images_ms: float
    inference_ms: float


class JobResult(BaseModel):
    """What a succeeded job produced."""

    text: str
    model: str
    tokens: TokenCounts
    timings: Timings


class JobFailure(BaseModel):
    """Why a job failed (or was canceled): a stable code and a message for humans."""

    code: str
    message: str


class QueuePlace(BaseModel):
    """Where a queued job stands under the queue's policy (shared/store/queues.py), as read with the job."""

    position: int = Field(description="jobs that start before it, if no other job arrives")
    eta_s: float | None = Field(description="seconds until it starts, from the throughput its model's workers "
                                            "measured in the last minute; null when unknown")
    waiting_reason: Literal["no_worker", "worker_starting", "key_at_capacity", "behind_other_jobs"] = Field(
        description="no_worker: no live worker serves the model (an autoscaler may be starting one); "
                    "worker_starting: a worker is loading the model; key_at_capacity: only its own key's jobs are "
                    "ahead (the key has every turn the fair share gives it); behind_other_jobs: other keys' jobs "
                    "(or the list) go first")

    @model_serializer(mode="wrap")
    def _eta_always(self, handler):
        """eta_s is null when unknown, also in the job's view that leaves out every other unset field."""
        return {**handler(self), "eta_s": self.eta_s}


class WebhookSpec(BaseModel):
    """A job's own webhook: where to POST its terminal event, and which events (default: every one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(description="https URL of a public host (the server's SSRF guard decides)")
    events: list[str] | None = Field(default=None, description="any of job.succeeded, job.failed, job.canceled")


class JobRequest(BaseModel):
    """The body of POST /v1/jobs, as a client sends it; bounds that depend on settings are checked in the API."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str = Field(description="describe, ocr or compare")
    images: list[str] = Field(description="https:// URLs, s3://bucket/key, upload://<id> (POST /v1/uploads), "
                                          "data:image/...;base64, URIs or paths under the server's image root")
    question: str | None = Field(default=None, description="overrides the task's default question")
    max_new_tokens: int | None = Field(default=None, description="defaults to the server's setting")
    webhook: WebhookSpec | None = Field(default=None, description="POST the job's terminal event here, signed")
    model: str | None = Field(default=None, description="one of the server's models; defaults to its default model")
    priority: str | None = Field(default=None, description="high, normal (the default) or low: the order within "
                                                           "the key's own queued jobs")
    start_within_s: float | None = Field(default=None, description="fail the job (deadline_exceeded) if it has not "
                                                                  "started this many seconds after submission")
    # The bounds are documented, not validated here: admission refuses them with invalid_num_crops.
    num_crops: int | None = Field(default=None, json_schema_extra={"minimum": 1, "maximum": MAX_NUM_CROPS},
                                  description="Phi-3-vision models only: at most this many 336x336 crops per image "
                                              "(default: the model's processor setting); 4 is faster, 16 reads "
                                              "finer detail. Other models refuse it (num_crops_unsupported)")


class Job(BaseModel):
    """A job as stored and as the API shows it."""

    id: str
    status: JobStatus
    task: str
    images: list[str] = Field(default_factory=list, exclude=True)  # refs may be large data URIs: never echoed
    owner: str | None = Field(default=None, exclude=True)  # the id of the API key that made it
    image_count: int
    question: str
    max_new_tokens: int
    model: str | None = None  # the model (and so the queue) the job is for; None only for jobs made before models
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    result: JobResult | None = None
    error: JobFailure | None = None
    webhook: WebhookSpec | None = None
    priority: str | None = None  # high | normal | low: the order within its key's line (batch items: low)
    start_within_s: float | None = None  # it fails as deadline_exceeded if not started this long after created_at
    num_crops: int | None = None  # Phi-3-vision's crops per image; None: the model's processor setting
    queue: QueuePlace | None = None  # a queued job's place, as read (never stored)
    batch_id: str | None = None  # the batch this job is an item of (shared/batches/)
    custom_id: str | None = None  # the item's id within its batch

    def public(self) -> dict:
        """The JSON-ready view that GET /v1/jobs/<id> returns."""
        return self.model_dump(mode="json", exclude_none=True)

    def public_json(self) -> str:
        """The same view, serialized (by pydantic's serializer: the hot path of polling)."""
        return self.model_dump_json(exclude_none=True)

    def to_hash(self) -> dict[str, str]:
        """The flat fields of the job's Redis hash."""
        fields = self.model_dump(mode="json", exclude={"result", "error", "images", "webhook", "queue"},
                                 exclude_none=True)
        flat = {key: str(value) for key, value in fields.items()}
        flat["images"] = json.dumps(self.images)
        if self.webhook is not None:  # JSON, read by the transition script when the job ends
            flat["webhook"] = self.webhook.model_dump_json()
        if self.owner is not None:
            flat["owner"] = self.owner
        return flat

    def start_deadline(self) -> float | None:
        """When the job must have started (a Unix time), or None."""
        return self.created_at.timestamp() + self.start_within_s if self.start_within_s else None

    @classmethod
    def from_hash(cls, raw: dict[str, str], place: QueuePlace | None = None) -> Job:
        """Rebuild a job from its Redis hash, with its place in the queue when it was read with it."""
        data: dict = dict(raw)
        data.pop("queue", None)  # the hash's queue name (lua/create_job.lua); Job.queue is the place, read apart
        if place is not None:
            data["queue"] = place
        data["images"] = json.loads(data.get("images", "[]"))
        for key in ("result", "error", "webhook"):
            if key in data:
                data[key] = json.loads(data[key])
        return cls.model_validate(data)
