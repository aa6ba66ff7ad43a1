"""The webhook endpoints of an API key: POST /v1/webhooks registers one (its signing secret is shown once),
GET lists them, DELETE removes one; GET /v1/webhooks/secret is the secret that signs the key's jobs' own
webhooks."""

from __future__ import annotations

from flask import Blueprint, g, request
from pydantic import ValidationError

from api.auth import authenticate, charge_now
from api.context import services
from api.jobs import invalid_fields
from api.schemas import EndpointRequest
from shared.errors import NotFound, TooManyEndpoints, UnsupportedMediaType
from shared.webhooks.events import BATCH_EVENTS, EVENTS
from shared.webhooks.targets import check_webhook

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
bp.before_request(authenticate)


@bp.post("")
def register_endpoint():
    """Register an endpoint for every terminal event (or those listed) of this key's jobs and batches."""
    svc = services()
    charge_now()
    body = check_webhook(parse_endpoint(), svc.settings, allowed=EVENTS + BATCH_EVENTS)
    endpoint = svc.hooks.add_endpoint(g.key.id, body.url, body.events, body.description,
                                      svc.settings.webhook_max_endpoints)
    if endpoint is None:
        raise TooManyEndpoints(f"this key already has {svc.settings.webhook_max_endpoints} endpoints")
    return {**endpoint.public(), "secret": endpoint.secret}, 201, {"Location": f"/v1/webhooks/{endpoint.id}"}


def parse_endpoint() -> EndpointRequest:
    if not request.is_json:
        raise UnsupportedMediaType()
    try:
        return EndpointRequest.model_validate_json(request.get_data(cache=False))
    except ValidationError as exc:
        raise invalid_fields(exc) from None


@bp.get("")
def list_endpoints():
    """This key's endpoints (never their secrets)."""
    svc = services()
    charge_now()
    return {"endpoints": [endpoint.public() for endpoint in svc.hooks.endpoints(g.key.id)]}


@bp.delete("/<endpoint_id>")
def delete_endpoint(endpoint_id: str):
    """Remove an endpoint; deliveries to it not yet made fail."""
    svc = services()
    charge_now()
    if not svc.hooks.delete_endpoint(g.key.id, endpoint_id):
        raise NotFound("no webhook endpoint with this id")
    return "", 204


@bp.get("/secret")
def job_webhook_secret():
    """The secret that signs the events sent to jobs' own webhook URLs (made on first use)."""
    svc = services()
    charge_now()
    return {"secret": svc.hooks.job_secret(g.key.id)}
