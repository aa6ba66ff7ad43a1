"""Health of the service: /healthz (this process is up) and /readyz (it can take and run jobs)."""

from __future__ import annotations

import redis
from flask import Blueprint

from api.context import services

bp = Blueprint("health", __name__)

# Workers beat every settings.heartbeat_s (10 s by default, worker/celery_app.py); three missed beats mean gone.
LIVE_WITHIN_S = 30.0


@bp.get("/healthz")
def healthz():
    """The process is up and serving requests."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """Redis answers and at least one worker has beaten recently; 503 with the reason otherwise."""
    store = services().store
    try:
        store.redis.ping()
        workers = services().workers.live(LIVE_WITHIN_S)
    except redis.RedisError as exc:
        return {"status": "unavailable", "reason": f"Redis cannot be reached ({type(exc).__name__})"}, 503
    if not workers:
        return {"status": "unavailable", "reason": f"no worker has been alive in the last {LIVE_WITHIN_S:g} s"}, 503
    return {"status": "ready", "workers": workers}
