"""API keys in Redis: a hash per key, found by the hash of its secret (shared/keys.py says what a key is)."""

from __future__ import annotations

import redis

from shared.jobs import utcnow
from shared.keys import ApiKey, hash_secret, key_id_of, new_secret
from shared.store.keys import API_KEY_IDS, KEY_WEIGHTS, api_key_key


class KeyStore:
    """Create, find, revoke and list API keys."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, name: str, **limits: float | int | list[str] | None) -> tuple[str, ApiKey]:
        """Make a key with optional limits (and `s3_buckets`, `admin`); returns its secret (shown once, never stored)
        and its facts."""
        secret = new_secret()
        secret_hash = hash_secret(secret)
        key = ApiKey(id=key_id_of(secret_hash), name=name, created_at=utcnow(),
                     **{k: v for k, v in limits.items() if v is not None})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(api_key_key(secret_hash), mapping={"json": key.model_dump_json()})
        pipe.hset(API_KEY_IDS, key.id, secret_hash)
        if key.weight is not None:  # read by the queue's dispatch (shared/store/lua/dispatch.lua), default 1
            pipe.hset(KEY_WEIGHTS, key.id, repr(key.weight))
        pipe.execute()
        return secret, key

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not (the worker reads a job owner's S3 buckets), or None."""
        secret_hash = self.redis.hget(API_KEY_IDS, key_id)
        raw = self.redis.hget(api_key_key(secret_hash), "json") if secret_hash else None
        return ApiKey.model_validate_json(raw) if raw else None

    def lookup(self, secret: str) -> ApiKey | None:
        """The live key with this secret, or None (unknown or revoked)."""
        raw = self.redis.hget(api_key_key(hash_secret(secret)), "json")
        key = ApiKey.model_validate_json(raw) if raw else None
        return key if key is not None and not key.revoked else None

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when there is no such key."""
        secret_hash = self.redis.hget(API_KEY_IDS, key_id)
        key = self.get(key_id)
        if key is None:
            return False
        self.redis.hset(api_key_key(secret_hash), "json", key.model_copy(update={"revoked": True}).model_dump_json())
        return True

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included."""
        hashes = list(self.redis.hgetall(API_KEY_IDS).values())
        raws = [self.redis.hget(api_key_key(h), "json") for h in hashes]
        return sorted((ApiKey.model_validate_json(raw) for raw in raws if raw), key=lambda k: k.created_at)
