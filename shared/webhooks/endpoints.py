"""Endpoints an API key registers (every terminal event of its jobs goes there too), and deliveries: one event on
its way to one URL, with its attempts."""

from __future__ import annotations

import secrets
from datetime import datetime

from pydantic import BaseModel, Field

from shared.jobs import utcnow


class Endpoint(BaseModel):
    """An endpoint an API key registered."""

    id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime
    secret: str | None = Field(default=None, description="the signing secret: in the answer to POST only")

    def public(self) -> dict:
        """The endpoint without its secret."""
        return self.model_dump(mode="json", exclude={"secret"}, exclude_none=True)


def new_endpoint_id() -> str:
    return "ep_" + secrets.token_hex(8)


class Attempt(BaseModel):
    """One try at sending a delivery."""

    attempt: int
    at: datetime
    status_code: int | None = None
    latency_ms: float
    error: str | None = None
    outcome: str = Field(description="delivered, retry or failed")


def attempt_entry(attempt: int, status_code: int | None, latency_ms: float, error: str | None) -> Attempt:
    """One attempt as logged (its outcome is settled by the store)."""
    return Attempt(attempt=attempt, at=utcnow(), status_code=status_code, latency_ms=round(latency_ms, 3),
                   error=error, outcome="")


class Delivery(BaseModel):
    """One event on its way to one URL, with every attempt so far."""

    id: str
    event_id: str = Field(description="the webhook-id header: the same on every attempt")
    type: str
    url: str
    endpoint_id: str | None = None
    status: str = Field(description="pending, delivered or failed")
    next_attempt_at: datetime | None = None
    attempts: list[Attempt]
