"""Uploaded images: bytes kept for settings.upload_ttl_s, usable as `upload://<id>` by jobs of the same API key.

The record of an upload (owner, size) is a Redis hash with a TTL. The bytes live in the same hash, or in S3 under
settings.uploads_s3_uri when that is set (an S3 lifecycle rule should then delete objects older than a day:
once the Redis record expires, nothing refers to them).
"""

from __future__ import annotations

import io
import secrets
import time
from datetime import datetime, timedelta
from typing import BinaryIO

import redis
from pydantic import BaseModel, Field

from shared.config import Settings
from shared.errors import ImageFetchFailed, ImageNotFound, ImageUnsupportedFormat, PayloadTooLarge, UploadQuotaExceeded
from shared.jobs import utcnow
from shared.outbound.s3 import parse_s3_uri, s3_client
from shared.store.connection import connect
from shared.store.keys import upload_bytes_key, upload_chunks_key, upload_key

SCHEME = "upload://"
NOT_FOUND = "no such upload for this API key (it may have expired)"
JSONL = "jsonl"  # the kind of an upload that is a batch's input file, not an image
CHUNK_BYTES = 1024 * 1024  # a JSONL upload is kept (and read back by its batch) in chunks of this size


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

    def put_stream(self, owner: str, stream: BinaryIO, max_bytes: int) -> Upload:
        """Store a JSONL file read from `stream` in chunks (never whole in memory), for a batch's input_file;
        PayloadTooLarge past `max_bytes`. Its record appears only once every byte is stored."""
        upload_id = secrets.token_urlsafe(18)
        if self.settings.uploads_s3_uri:
            location = parse_s3_uri(self.settings.uploads_s3_uri.rstrip("/") + "/" + upload_id)
            counted = _Counted(stream, max_bytes, lambda size: self._charge_quota(owner, size))
            s3_client(self.settings).upload_fileobj(counted, location.bucket, location.key)
            fields: dict[str, str | int] = {"s3_key": location.key}
            size = counted.size
        else:
            size, fields = self._put_chunks(owner, upload_id, stream, max_bytes), {}
        fields |= {"owner": owner, "size": size, "kind": JSONL}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(upload_key(upload_id), mapping=fields)
        pipe.expire(upload_key(upload_id), self.settings.upload_ttl_s)
        pipe.expire(upload_chunks_key(upload_id), self.settings.upload_ttl_s)
        pipe.execute()
        return Upload(ref=SCHEME + upload_id, size=size,
                      expires_at=utcnow() + timedelta(seconds=self.settings.upload_ttl_s))

    def _put_chunks(self, owner: str, upload_id: str, stream: BinaryIO, max_bytes: int) -> int:
        key, size = upload_chunks_key(upload_id), 0
        try:
            while chunk := _read_full(stream, CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the file is larger than {max_bytes} bytes")
                self._charge_quota(owner, len(chunk))
                pipe = self.redis.pipeline(transaction=True)
                pipe.rpush(key, chunk)
                pipe.expire(key, self.settings.upload_ttl_s)  # a request that dies half-way leaves nothing for good
                pipe.execute()
        except BaseException:
            self.redis.delete(key)
            raise
        return size

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

    def keep(self, upload_ids: set[str], ttl_s: int) -> None:
        """Keep these uploads at least `ttl_s` from now (a batch that uses them may reach them hours later); an
        upload kept in S3 stays as long as its bucket's lifecycle rule lets it."""
        pipe = self.redis.pipeline(transaction=False)
        for upload_id in upload_ids:
            pipe.expire(upload_key(upload_id), ttl_s, gt=True)
        pipe.execute()

    def size_for(self, upload_id: str, owner: str | None) -> int:
        """The upload's size if it exists and `owner` made it; another key's upload is reported as missing."""
        stored_owner, size, kind = self.redis.hmget(upload_key(upload_id), ["owner", "size", "kind"])
        if stored_owner is None or stored_owner.decode() != (owner or ""):
            raise ImageNotFound(NOT_FOUND)
        if kind is not None:
            raise ImageUnsupportedFormat("this upload is a JSONL file (a batch's input), not an image")
        return int(size)

    def get(self, upload_id: str, owner: str | None) -> bytes:
        """The bytes of `owner`'s upload; ImageNotFound for a missing, expired or foreign one."""
        stored_owner, data, s3_key, kind = self.redis.hmget(upload_key(upload_id), ["owner", "data", "s3_key", "kind"])
        if stored_owner is None or stored_owner.decode() != (owner or ""):
            raise ImageNotFound(NOT_FOUND)
        if kind is not None:
            raise ImageUnsupportedFormat("this upload is a JSONL file (a batch's input), not an image")
        return data if s3_key is None else self._get_s3(s3_key.decode())

    def _put_s3(self, upload_id: str, data: bytes) -> str:
        location = parse_s3_uri(self.settings.uploads_s3_uri.rstrip("/") + "/" + upload_id)
        s3_client(self.settings).put_object(Bucket=location.bucket, Key=location.key, Body=data)
        return location.key

    def bucket(self) -> str:
        """The bucket of uploads kept in S3 (settings.uploads_s3_uri)."""
        return parse_s3_uri(self.settings.uploads_s3_uri.rstrip("/") + "/x").bucket

    def _get_s3(self, key: str) -> bytes:
        bucket = self.bucket()
        try:
            return s3_client(self.settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore's errors: the record exists, so the bytes should too
            raise ImageFetchFailed("the uploaded image could not be read from S3") from exc


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes: a request stream may answer a read with fewer while more is coming."""
    parts, left = [], size
    while left > 0 and (part := stream.read(left)):
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class _Counted(io.RawIOBase):
    """A stream read through once by boto3's uploader, counted, bounded and charged to the quota as it goes."""

    def __init__(self, stream: BinaryIO, max_bytes: int, charge):
        self.stream, self.max_bytes, self.charge, self.size = stream, max_bytes, charge, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = _read_full(self.stream, size if size >= 0 else self.max_bytes + 1)
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"the file is larger than {self.max_bytes} bytes")
        if data:
            self.charge(len(data))
        return data


def upload_id_of(ref: str) -> str:
    """The id of an `upload://<id>` ref."""
    return ref[len(SCHEME):]
