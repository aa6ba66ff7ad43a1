"""API keys looked up by secret, remembered for a couple of seconds, so that a request does not always cost a
Redis read (a revoked key stops working within settings.key_cache_s)."""

from __future__ import annotations

import threading
import time

from shared.keys import ApiKey, hash_secret
from shared.store.api_keys import KeyStore


class KeyCache:
    """Key lookups remembered for `ttl_s`, unknown secrets included (bounded in number)."""

    def __init__(self, keys: KeyStore, ttl_s: float):
        self.keys, self.ttl_s = keys, ttl_s
        self._entries: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, secret: str) -> ApiKey | None:
        cache_key = hash_secret(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        key = self.keys.lookup(secret)
        with self._lock:
            if len(self._entries) > 10_000:  # unknown secrets must not grow it without bound
                self._entries.clear()
            self._entries[cache_key] = (now + self.ttl_s, key)
        return key
