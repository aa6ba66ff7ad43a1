"""GET /v1/queues: each model's queue as the caller sees it (for dashboards): jobs queued in all and the caller's
own still waiting their turn, live workers, and the jobs per second its workers ended in the last minute."""

from __future__ import annotations

from flask import Blueprint, g

from api.auth import authenticate, charge_now
from api.context import services
from shared.routing import queue_for

bp = Blueprint("queues", __name__, url_prefix="/v1/queues")
bp.before_request(authenticate)


@bp.get("")
def list_queues():
    """One entry per model the server accepts, the default model first."""
    svc = services()
    charge_now()
    return {"queues": [{"model": model, **svc.queues.overview(queue_for(svc.settings, model), g.key.id)}
                       for model in svc.settings.served_models]}
