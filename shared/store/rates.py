"""Rate limits: a token bucket per API key in Redis (GCRA, on the server's clock: lua/token_bucket.lua)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.store import scripts
from shared.store.keys import rate_key


@dataclass(frozen=True)
class Charge:
    """One request to take from an owner's token bucket."""

    owner: str
    rate_per_s: float
    burst: int


UNLIMITED = Charge("", 1e9, 10**9)


class RateLimiter:
    """Takes requests from owners' buckets."""

    def __init__(self, client: redis.Redis):
        self._take_token = scripts.register(client, "take_token")

    def take(self, charge: Charge) -> float:
        """Spend one request from the owner's bucket: 0 when allowed, else the seconds until one is free."""
        return float(self._take_token(keys=[rate_key(charge.owner)], args=[charge.rate_per_s, charge.burst]))
