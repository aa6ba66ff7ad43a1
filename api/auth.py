"""Who is calling: the Bearer API key of every /v1 request, then its rate limit."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from flask import g, request

from api.context import Services, services
from shared.config import Settings
from shared.errors import RateLimited, Unauthorized
from shared.keys import ANONYMOUS_ID, ApiKey
from shared.store.rates import Charge

ANONYMOUS = ApiKey(id=ANONYMOUS_ID, name="anonymous", created_at=datetime(2026, 1, 1, tzinfo=UTC))


def authenticate() -> None:
    """Set g.key from the Authorization header (or the anonymous key when auth is off), and g.charge: what
    each view takes from the key's token bucket, in the same round trip as its own work where it can."""
    svc = services()
    g.key = key_for(request.headers.get("Authorization", ""), svc) if svc.settings.auth_enabled else ANONYMOUS
    g.charge = charge_of(g.key, svc.settings)


def charge_of(key: ApiKey, settings: Settings) -> Charge:
    """What one request of this key takes from its token bucket."""
    rate, burst, _ = key.limits(settings)
    return Charge(key.id, rate, burst)


def charge_now() -> None:
    """Take this request from the bucket on its own (views with no Redis work to share the trip with)."""
    check_rate(services().rates.take(g.charge))


def check_rate(wait_s: float) -> None:
    """Refuse the request when the bucket said to wait."""
    if wait_s > 0:
        raise RateLimited(headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def key_for(authorization: str, svc: Services) -> ApiKey:
    """The key of an `Authorization: Bearer <secret>` header (outside Flask too: api/fast_poll.py)."""
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized()
    key = svc.key_cache.lookup(secret.strip())
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    return key
