"""S3 (and S3-compatible stores: MinIO, R2, ...) through boto3: s3:// URIs, one client per process, bounded reads.

Credentials come from boto3's standard chain (environment, shared files, instance roles); only the endpoint and
region come from our settings. boto3 clients are thread-safe, so the images of a job share one.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from shared.config import Settings

# Bucket names as S3 defines them; keys are any non-empty string of up to 1024 bytes.
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_clients: dict[tuple, object] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/key` split and checked; ValueError when it is not one."""
    if not uri.startswith("s3://"):
        raise ValueError("an S3 URI starts with s3://")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not BUCKET.match(bucket):
        raise ValueError("the S3 bucket name is not valid")
    if not key or len(key.encode()) > 1024:
        raise ValueError("the S3 key must be 1 to 1024 bytes")
    return S3Location(bucket, key)


def s3_client(settings: Settings):
    """The process's boto3 S3 client for these settings (made once: making one takes tens of milliseconds)."""
    import boto3
    from botocore.config import Config

    identity = (settings.s3_endpoint_url, settings.s3_region, settings.url_connect_timeout_s,
                settings.url_read_timeout_s)
    with _lock:
        if identity not in _clients:
            config = Config(connect_timeout=settings.url_connect_timeout_s, read_timeout=settings.url_read_timeout_s,
                            retries={"mode": "standard", "max_attempts": 2})
            _clients[identity] = boto3.session.Session().client(
                "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region or None,
                config=config)
        return _clients[identity]


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "404", "AccessDenied", ...), else ""."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
