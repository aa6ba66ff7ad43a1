"""A job's webhook deliveries: GET /v1/jobs/<id>/deliveries lists each with its attempts;
POST /v1/jobs/<id>/deliveries/<delivery>/retry sends it again (same event, same webhook-id)."""

from __future__ import annotations

from flask import Blueprint

from api.auth import authenticate, charge_now
from api.context import services
from api.jobs import owned
from shared.errors import DeliveryInProgress, NotFound
from shared.webhooks.endpoints import Delivery

bp = Blueprint("deliveries", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)


@bp.get("/<job_id>/deliveries")
def list_deliveries(job_id: str):
    """Every delivery of the job's event, with every attempt (time, status code, latency, error)."""
    svc = services()
    charge_now()
    owned(svc.store.get(job_id))
    return {"deliveries": [public(delivery) for delivery in svc.hooks.deliveries(job_id)]}


@bp.post("/<job_id>/deliveries/<delivery_id>/retry")
def retry_delivery(job_id: str, delivery_id: str):
    """Send a delivery again now, on a fresh retry schedule, whatever became of it."""
    svc = services()
    charge_now()
    owned(svc.store.get(job_id))
    outcome = svc.hooks.retry(job_id, delivery_id, int(svc.settings.webhook_horizon_s) + 3600)
    if outcome == "missing":
        raise NotFound("this job has no delivery with this id")
    if outcome == "busy":
        raise DeliveryInProgress()
    delivery = next((d for d in svc.hooks.deliveries(job_id) if d.id == delivery_id), None)
    if delivery is None:  # expired in between
        raise NotFound("this job has no delivery with this id")
    return public(delivery), 202


def public(delivery: Delivery) -> dict:
    return delivery.model_dump(mode="json", exclude_none=True)
