"""Webhooks on job completion: what a webhook is (a job's own, or an API key's registered endpoint), the event
and its Standard Webhooks signature, and the retry schedule. Redis lives in shared/webhook_store.py, sending in
worker/webhooks.py.

Signatures are those of the Standard Webhooks specification (headers webhook-id, webhook-timestamp and
webhook-signature: HMAC-SHA256 of "id.timestamp.body"), made by the `standardwebhooks` package so that any
receiver using one of its libraries verifies them as they are.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field
from standardwebhooks import Webhook

from shared.config import Settings
from shared.errors import InvalidWebhookEvents, WebhookUrlRefused
from shared.netguard import UrlRefused, check_url

EVENTS = ("job.succeeded", "job.failed", "job.canceled")
SECRET_PREFIX = "whsec_"
JOB_DELIVERY = "job"  # the delivery id of a job's own webhook; a registered endpoint's is the endpoint's id


class WebhookSpec(BaseModel):
    """A job's own webhook: where to POST its terminal event, and which events (default: every one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(description="https URL of a public host (the server's SSRF guard decides)")
    events: list[str] | None = Field(default=None, description="any of job.succeeded, job.failed, job.canceled")


class EndpointRequest(WebhookSpec):
    """The body of POST /v1/webhooks."""

    description: str | None = Field(default=None, max_length=200)


class Endpoint(BaseModel):
    """An endpoint an API key registered: every terminal event of its jobs goes there too."""

    id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime
    secret: str | None = Field(default=None, description="the signing secret: in the answer to POST only")

    def public(self) -> dict:
        """The endpoint without its secret."""
        return self.model_dump(mode="json", exclude={"secret"}, exclude_none=True)


class Attempt(BaseModel):
    """One try at sending a delivery."""

    attempt: int
    at: datetime
    status_code: int | None = None
    latency_ms: float
    error: str | None = None
    outcome: str = Field(description="delivered, retry or failed")


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


class DeliveryList(BaseModel):
    """GET /v1/jobs/<id>/deliveries."""

    deliveries: list[Delivery]


class EndpointList(BaseModel):
    """GET /v1/webhooks (secrets are never listed)."""

    endpoints: list[Endpoint]


class SigningSecret(BaseModel):
    """GET /v1/webhooks/secret."""

    secret: str = Field(description="whsec_...: verifies the events sent to jobs' own webhook URLs")


def check_webhook(spec: WebhookSpec, settings: Settings) -> WebhookSpec:
    """The spec with its events spelled out, once its URL passes the SSRF guard (one DNS lookup) and its events
    are known ones; else WebhookUrlRefused (400) or InvalidWebhookEvents (422)."""
    if len(spec.url) > settings.webhook_max_url_chars:
        raise WebhookUrlRefused(f"the webhook URL is longer than {settings.webhook_max_url_chars} characters")
    try:
        check_url(spec.url, settings)
    except UrlRefused as exc:
        raise WebhookUrlRefused(f"webhook URL refused: {exc}") from None
    events = list(EVENTS) if spec.events is None else spec.events
    if not events or len(set(events)) != len(events) or not set(events) <= set(EVENTS):
        raise InvalidWebhookEvents(f"webhook events must be a non-empty list of distinct: {', '.join(EVENTS)}")
    return spec.model_copy(update={"events": events})


def new_secret() -> str:
    """A fresh signing secret, whsec_ and 32 random bytes in base64 (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_endpoint_id() -> str:
    return "ep_" + secrets.token_hex(8)


def event_type(status: str) -> str:
    return f"job.{status}"


def event_id(job_id: str) -> str:
    """A job ends once, so its one event takes its id from the job's (the store also writes it so)."""
    return f"msg_{job_id}"


def payload(job_public: dict) -> str:
    """The body of the event of a job that has ended: the job exactly as GET /v1/jobs/<id> returns it."""
    body = {"type": event_type(job_public["status"]), "timestamp": job_public.get("finished_at"),
            "data": job_public}
    return json.dumps(body, separators=(",", ":"))


def signed_headers(secret: str, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for this body, signed now."""
    now = now or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }


def retryable(status_code: int | None) -> bool:
    """Whether an answer is worth trying again: no answer at all, 5xx, 429, and 408 (the receiver itself says
    it timed out waiting for us). Other 4xx mean the receiver refuses this request and will again; a redirect
    is not followed (a webhook URL should be the final one) and is not retried either."""
    return status_code is None or status_code >= 500 or status_code in (408, 429)


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The wait after the `attempt`-th failure: base * 2^(attempt-1), capped at max, with jitter (half of it
    random) so that receivers coming back are not hit by every sender at once."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """The seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
