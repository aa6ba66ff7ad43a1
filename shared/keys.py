"""API keys: what a key is, how a secret is made and hashed. Only the hash is ever stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from pydantic import BaseModel, Field

from shared.config import Settings

SECRET_PREFIX = "vq_"
ANONYMOUS_ID = "anonymous"  # the owner of every job when auth is switched off


class ApiKey(BaseModel):
    """A key's public facts and its limits (None: the server's default)."""

    id: str
    name: str
    created_at: datetime
    revoked: bool = False
    admin: bool = False  # may see every key's jobs in the web console (api/console/)
    rate_per_s: float | None = None
    burst: int | None = None
    max_active_jobs: int | None = None
    weight: float | None = Field(default=None, gt=0, le=1000)  # its share of a queue against other keys (None: 1)
    s3_buckets: list[str] = []  # buckets this key's jobs may read with s3:// refs (besides settings.s3_allowed_buckets)

    def limits(self, settings: Settings) -> tuple[float, int, int]:
        """(requests per second, burst, jobs queued or running at once) for this key."""
        return (self.rate_per_s or settings.rate_per_s, self.burst or settings.rate_burst,
                self.max_active_jobs or settings.max_active_jobs)


def new_secret() -> str:
    """A fresh key secret: 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The stored form of a secret (a fast hash suffices: secrets are random, not passwords)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret_hash: str) -> str:
    """The short, public id of a key, derived from its hash."""
    return secret_hash[:16]
