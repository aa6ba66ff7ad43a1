"""Fetching the bytes of remote images, bounded: https:// through the SSRF-guarded client, s3:// through boto3.

Every fetch takes its bytes from the job's Budget as they arrive, so that the images of one job, fetched at once,
together stay under the job's bound, and a failure of one stops the others at their next chunk.
"""

from __future__ import annotations

import threading
import time

import httpx

from shared.config import Settings
from shared.errors import (
    ImageBucketNotAllowed,
    ImageFetchFailed,
    ImageForbiddenAddress,
    ImageNotFound,
    ImageTooLarge,
    ImageUnsupportedFormat,
    InvalidImageRef,
)
from shared.outbound.netguard import ForbiddenAddress, HostNotFound, UrlRefused, guarded_client
from shared.outbound.s3 import S3Location, error_code, s3_client

S3_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class Budget:
    """What one job's images may still use (bytes and pixels), shared by the threads that fetch them."""

    def __init__(self, settings: Settings):
        self.bytes_left = settings.max_job_image_bytes
        self.pixels_left = settings.max_job_image_pixels
        self.stopped = False
        self._lock = threading.Lock()

    def take_bytes(self, count: int) -> None:
        """Spend bytes; ImageTooLarge once the job's images together are over the bound."""
        with self._lock:
            if self.stopped:
                raise ImageFetchFailed("another image of the job failed")
            self.bytes_left -= count
            if self.bytes_left < 0:
                raise ImageTooLarge("the images of the job together are larger than the bound")

    def take_pixels(self, count: int) -> None:
        """Spend pixels; ImageTooLarge once the job's images together have too many."""
        with self._lock:
            self.pixels_left -= count
            if self.pixels_left < 0:
                raise ImageTooLarge("the images of the job together have more pixels than the bound")

    def stop(self) -> None:
        """Make the fetches still running give up at their next chunk."""
        self.stopped = True


_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


def http_client(settings: Settings) -> httpx.Client:
    """The process's guarded client for these settings (one connection pool for every job)."""
    identity = (settings.allow_http, tuple(settings.url_allowed_networks), tuple(settings.url_allow_hosts),
                tuple(settings.url_deny_hosts), settings.url_connect_timeout_s, settings.url_read_timeout_s,
                settings.url_max_redirects)
    with _clients_lock:
        if identity not in _clients:
            _clients[identity] = guarded_client(settings)
        return _clients[identity]


def fetch_url(url: str, settings: Settings, budget: Budget) -> bytes:
    """GET an image over https (http when allowed), at most settings.max_image_bytes, within the total timeout."""
    deadline = time.monotonic() + settings.url_total_timeout_s
    try:
        response = follow(http_client(settings), url, settings, deadline)
        try:
            check_response(response, settings)
            return read_body(response, settings.max_image_bytes, deadline, budget)
        finally:
            response.close()
    except ForbiddenAddress as exc:
        raise ImageForbiddenAddress(str(exc)) from None
    except HostNotFound as exc:
        raise ImageFetchFailed(str(exc)) from None
    except UrlRefused as exc:
        raise InvalidImageRef(str(exc)) from None
    except httpx.TooManyRedirects:
        raise ImageFetchFailed(f"more than {settings.url_max_redirects} redirects") from None
    except httpx.TimeoutException:
        raise ImageFetchFailed("the image server did not answer in time") from None
    except httpx.HTTPError as exc:
        raise ImageFetchFailed(f"the image could not be fetched ({type(exc).__name__})") from None


def follow(client: httpx.Client, url: str, settings: Settings, deadline: float) -> httpx.Response:
    """The streamed response at the end of at most settings.url_max_redirects redirects. The hops are followed
    here rather than by httpx so that each gets only the time left of the total (the guard still checks each)."""
    request = client.build_request("GET", url, headers=REQUEST_HEADERS)
    for _ in range(settings.url_max_redirects + 1):
        request.extensions["timeout"] = hop_timeout(settings, deadline)
        response = client.send(request, stream=True, follow_redirects=False)
        if response.next_request is None:
            return response
        response.close()
        request = response.next_request
    raise httpx.TooManyRedirects("too many redirects", request=request)


def hop_timeout(settings: Settings, deadline: float) -> dict[str, float]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageFetchFailed("the image took longer than the total timeout to fetch")
    connect, read = min(settings.url_connect_timeout_s, left), min(settings.url_read_timeout_s, left)
    return httpx.Timeout(read, connect=connect).as_dict()


# Identity only: a compressed body could expand far beyond what we counted on the wire.
REQUEST_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "visionq"}


def check_response(response: httpx.Response, settings: Settings) -> None:
    """Refuse a response that is an error, not an image, compressed, or declares too many bytes."""
    if response.status_code in (404, 410):
        raise ImageNotFound(f"the image server answered {response.status_code}")
    if response.status_code != 200:
        raise ImageFetchFailed(f"the image server answered {response.status_code}")
    content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if not content_type.startswith("image/"):
        raise ImageUnsupportedFormat(f"the URL serves {content_type or 'no content type'}, not an image")
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise ImageFetchFailed("the image server sent a compressed body, which is not accepted")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > settings.max_image_bytes:
        raise ImageTooLarge(f"the image is {declared} bytes, over the bound of {settings.max_image_bytes}")


def read_body(response: httpx.Response, max_bytes: int, deadline: float, budget: Budget) -> bytes:
    """The body, counted while it streams: stops as soon as it passes `max_bytes` or the deadline."""
    parts: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():  # as the network delivers it (a chunk_size would buffer up to that size)
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLarge(f"the image is larger than the bound of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ImageFetchFailed("the image took longer than the total timeout to download")
        budget.take_bytes(len(chunk))
        parts.append(chunk)
    return b"".join(parts)


def fetch_s3(location: S3Location, settings: Settings, budget: Budget) -> bytes:
    """An S3 object, its size checked with HEAD before the download."""
    client = s3_client(settings)
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
        size = int(head["ContentLength"])
        if size > settings.max_image_bytes:
            raise ImageTooLarge(f"the S3 object is {size} bytes, over the bound of {settings.max_image_bytes}")
        budget.take_bytes(size)
        body = client.get_object(Bucket=location.bucket, Key=location.key, IfMatch=head["ETag"])["Body"]
        return body.read(settings.max_image_bytes)  # bounded even if the object changed since the HEAD
    except (ImageTooLarge, ImageFetchFailed):
        raise
    except Exception as exc:  # botocore: ClientError, connection and timeout errors
        if error_code(exc) in S3_NOT_FOUND:
            raise ImageNotFound(f"no such S3 object: {location.uri}") from None
        raise ImageFetchFailed(f"the S3 object could not be read ({error_code(exc) or type(exc).__name__})") from None


def check_bucket(bucket: str, key_buckets: frozenset[str], settings: Settings) -> None:
    """Refuse a bucket that neither the settings nor the caller's API key allow."""
    allowed = set(settings.s3_allowed_buckets) | key_buckets
    if "*" not in allowed and bucket not in allowed:
        raise ImageBucketNotAllowed(f"this API key may not read the S3 bucket {bucket!r}")
