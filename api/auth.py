"""Who is calling: the Bearer API key of every /v1 request, then its rate limit."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from flask import g, request

from api.context import services
from shared.errors import RateLimited, Unauthorized
from shared.keys import ANONYMOUS_ID, ApiKey
from shared.store.rates import Charge

ANONYMOUS = ApiKey(id=ANONYMOUS_ID, name="anonymous", created_at=datetime(2026, 1, 1, tzinfo=UTC))


def authenticate() -> None:
    """Set g.key from the Authorization header (or the anonymous key when auth is off), and g.charge: what
    each view takes from the key's token bucket, in the same round trip as its own work where it can."""
    svc = services()
    g.key = caller_key() if svc.settings.auth_enabled else ANONYMOUS
    rate, burst, _ = g.key.limits(svc.settings)
    g.charge = Charge(g.key.id, rate, burst)


def charge_now() -> None:
    """Take this request from the bucket on its own (views with no Redis work to share the trip with)."""
    check_rate(services().rates.take(g.charge))


def check_rate(wait_s: float) -> None:
    """Refuse the request when the bucket said to wait."""
    if wait_s > 0:
        raise RateLimited(headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def caller_key() -> ApiKey:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized()
    key = services().key_cache.lookup(secret.strip())
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    return key
