"""Web console sign-ins in Redis: a random token in the browser's cookie, a hash per sign-in found by the token's
hash, holding the API key's id and the sign-in's CSRF token (api/console/ says why it is kept so)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import redis

from shared.store.keys import console_session_key


@dataclass(frozen=True)
class ConsoleSession:
    """One sign-in: whose key, and the token its forms must carry."""

    key_id: str
    csrf: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleSessions:
    """Start, find and end console sign-ins, each for `ttl_s` at most."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis, self.ttl_s = client, ttl_s

    def start(self, key_id: str) -> tuple[str, ConsoleSession]:
        """A new sign-in for this key: (the cookie's token, never stored as such; the session)."""
        token, session = secrets.token_urlsafe(32), ConsoleSession(key_id, secrets.token_urlsafe(32))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(console_session_key(_hash(token)), mapping={"key_id": key_id, "csrf": session.csrf})
        pipe.expire(console_session_key(_hash(token)), self.ttl_s)
        pipe.execute()
        return token, session

    def get(self, token: str) -> ConsoleSession | None:
        """The sign-in of this cookie token, or None (unknown, signed out or expired)."""
        raw = self.redis.hgetall(console_session_key(_hash(token))) if token else {}
        return ConsoleSession(raw["key_id"], raw["csrf"]) if raw.get("key_id") and raw.get("csrf") else None

    def end(self, token: str) -> None:
        """Sign out: the token stops working at once, in every API process."""
        self.redis.delete(console_session_key(_hash(token)))
