"""Uploaded images: bytes kept for settings.upload_ttl_s, usable as `upload://<id>` by jobs of the same API key.

The record of an upload (owner, size) is a Redis hash with a TTL. The bytes live in the same hash, or in S3 under
settings.uploads_s3_uri when that is set (an S3 lifecycle rule should then delete objects older than a day:
once the Redis record expires, nothing refers to them).
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta

import redis
from pydantic import BaseModel, Field

from shared.config import Settings
from shared.errors import ImageFetchFailed, ImageNotFound, UploadQuotaExceeded
from shared.jobs import utcnow
from shared.outbound.s3 import parse_s3_uri, s3_client
from shared.store.connection import connect
from shared.store.keys import upload_bytes_key, upload_key

SCHEME = "upload://"
NOT_FOUND = "no such upload for this API key (it may have expired)"


class Upload(BaseModel):
    """One stored image."""

    ref: str = Field(description="upload://<id>: use it in the images of jobs of the same API key")
    size: int = Field(description="bytes")
    expires_at: datetime


class UploadList(BaseModel):
    """What POST /v1/uploads answers."""

    uploads: list[Upload]


class UploadStore:
    """Uploads in Redis (bytes in Redis, or in S3 when configured); reads check the owner."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.redis = client or connect(settings, decode_responses=False)  # the bytes are not text

    def put(self, owner: str, data: bytes) -> Upload:
        """Store the bytes for `owner`; returns the ref to use in jobs. UploadQuotaExceeded when the owner has
        stored settings.max_upload_bytes_per_key within the last upload_ttl_s."""
        self._charge_quota(owner, len(data))
        upload_id = secrets.token_urlsafe(18)
        fields: dict[str, str | bytes | int] = {"owner": owner, "size": len(data)}
        if self.settings.uploads_s3_uri:
            fields["s3_key"] = self._put_s3(upload_id, data)
        else:
            fields["data"] = data
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(upload_key(upload_id), mapping=fields)
        pipe.expire(upload_key(upload_id), self.settings.upload_ttl_s)
        pipe.execute()
        expires_at = utcnow() + timedelta(seconds=self.settings.upload_ttl_s)
        return Upload(ref=SCHEME + upload_id, size=len(data), expires_at=expires_at)

    def _charge_quota(self, owner: str, size: int) -> None:
        # An upload alive now was made in this window of upload_ttl_s or the one before: their sum bounds what the
        # owner has stored (from above: a bound, not an exact count).
        ttl = self.settings.upload_ttl_s
        window = int(time.time() // ttl)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incrby(upload_bytes_key(owner, window), size)
        pipe.expire(upload_bytes_key(owner, window), 2 * ttl)
        pipe.get(upload_bytes_key(owner, window - 1))
        current, _, previous = pipe.execute()
        if current + int(previous or 0) > self.settings.max_upload_bytes_per_key:
            self.redis.decrby(upload_bytes_key(owner, window), size)
            raise UploadQuotaExceeded(f"this key has uploaded {self.settings.max_upload_bytes_per_key} bytes "
                                      f"within {ttl} s; retry when earlier uploads have expired")

    def size_for(self, upload_id: str, owner: str | None) -> int:
        """The upload's size if it exists and `owner` made it; another key's upload is reported as missing."""
        stored_owner, size = self.redis.hmget(upload_key(upload_id), ["owner", "size"])
        if stored_owner is None or stored_owner.decode() != (owner or ""):
            raise ImageNotFound(NOT_FOUND)
        return int(size)

    def get(self, upload_id: str, owner: str | None) -> bytes:
        """The bytes of `owner`'s upload; ImageNotFound for a missing, expired or foreign one."""
        stored_owner, data, s3_key = self.redis.hmget(upload_key(upload_id), ["owner", "data", "s3_key"])
        if stored_owner is None or stored_owner.decode() != (owner or ""):
            raise ImageNotFound(NOT_FOUND)
        return data if s3_key is None else self._get_s3(s3_key.decode())

    def _put_s3(self, upload_id: str, data: bytes) -> str:
        location = parse_s3_uri(self.settings.uploads_s3_uri.rstrip("/") + "/" + upload_id)
        s3_client(self.settings).put_object(Bucket=location.bucket, Key=location.key, Body=data)
        return location.key

    def _get_s3(self, key: str) -> bytes:
        bucket = parse_s3_uri(self.settings.uploads_s3_uri.rstrip("/") + "/x").bucket
        try:
            return s3_client(self.settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore's errors: the record exists, so the bytes should too
            raise ImageFetchFailed("the uploaded image could not be read from S3") from exc


def upload_id_of(ref: str) -> str:
    """The id of an `upload://<id>` ref."""
    return ref[len(SCHEME):]
