"""The event a job's (or a batch's) end sends, and its Standard Webhooks signature.

Signatures are those of the Standard Webhooks specification (headers webhook-id, webhook-timestamp and
webhook-signature: HMAC-SHA256 of "id.timestamp.body"), made by the `standardwebhooks` package so that any
receiver using one of its libraries verifies them as they are.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

EVENTS = ("job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.canceled")  # one when a batch ends (shared/batches/)
SECRET_PREFIX = "whsec_"
JOB_DELIVERY = "job"  # the delivery id of a job's own webhook; a registered endpoint's is the endpoint's id


def event_type(status: str) -> str:
    return f"job.{status}"


def event_id(job_id: str) -> str:
    """A job ends once, so its one event takes its id from the job's (the outbox also writes it so)."""
    return f"msg_{job_id}"


def payload(job_public: dict) -> str:
    """The body of the event of a job that has ended: the job exactly as GET /v1/jobs/<id> returns it."""
    body = {"type": event_type(job_public["status"]), "timestamp": job_public.get("finished_at"),
            "data": job_public}
    return json.dumps(body, separators=(",", ":"))


def batch_payload(batch_public: dict) -> str:
    """The body of the event of a batch that has ended: the batch exactly as GET /v1/batches/<id> returns it."""
    body = {"type": f"batch.{batch_public['status']}", "timestamp": batch_public.get("finished_at"),
            "data": batch_public}
    return json.dumps(body, separators=(",", ":"))


def new_secret() -> str:
    """A fresh signing secret, whsec_ and 32 random bytes in base64 (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(secret: str, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for this body, signed now."""
    now = now or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }
