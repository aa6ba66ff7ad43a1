"""The bodies the HTTP API answers with, besides the job itself (shared/jobs.py): pages, lists, errors. They
exist for the OpenAPI document and the views; nothing outside api/ uses them."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.batches.batch import Batch
from shared.images.uploads import Upload
from shared.jobs import Job, WebhookSpec
from shared.webhooks.endpoints import Delivery, Endpoint


class JobPage(BaseModel):
    """One page of GET /v1/jobs."""

    jobs: list[Job]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class BatchPage(BaseModel):
    """One page of GET /v1/batches."""

    batches: list[Batch]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str
    details: list[dict] | None = None


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


class UploadList(BaseModel):
    """What POST /v1/uploads answers."""

    uploads: list[Upload]


class EndpointRequest(WebhookSpec):
    """The body of POST /v1/webhooks."""

    description: str | None = Field(default=None, max_length=200)


class EndpointList(BaseModel):
    """GET /v1/webhooks (secrets are never listed)."""

    endpoints: list[Endpoint]


class DeliveryList(BaseModel):
    """GET /v1/jobs/<id>/deliveries."""

    deliveries: list[Delivery]


class SigningSecret(BaseModel):
    """GET /v1/webhooks/secret."""

    secret: str = Field(description="whsec_...: verifies the events sent to jobs' own webhook URLs")


class QueueFigures(BaseModel):
    """One model's queue, for dashboards (GET /v1/queues)."""

    model: str
    queued: int = Field(description="jobs queued for the model, every key's: on its list or waiting their turn")
    queued_for_key: int = Field(description="the caller's jobs still waiting their key's turn")
    live_workers: int
    starting_workers: int = Field(description="workers still loading the model")
    jobs_per_s: float = Field(description="jobs its workers ended per second over the last minute")


class QueueList(BaseModel):
    queues: list[QueueFigures]
