"""Image references: parse and bound them (the API's check), then fetch and decode them (the worker).

A reference is one of:
- `https://...` (`http://` only with settings.allow_http): fetched through the SSRF guard (shared/netguard.py);
- `s3://bucket/key`: read with boto3 from a bucket the job's API key may read;
- `upload://<id>`: bytes uploaded with POST /v1/uploads by the same API key;
- `data:image/<type>;base64,<data>`;
- a path under settings.image_root.
`validate_ref` is the API's check (no image is read: it checks the form, the bounds, the SSRF guard with one DNS
lookup, the bucket and the upload's owner); `load_images` is the worker's: every image of a job at once, bounded.
`fetch_images` is its first half: the bytes, bounded and their headers checked (sizes, the job's pixels), left to
decode elsewhere (the worker decodes them in its preprocessing processes: worker/preprocess.py).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from shared.config import Settings
from shared.errors import (
    ImageForbiddenAddress,
    ImageNotFound,
    ImageTooLarge,
    ImageUnreadable,
    InvalidImageRef,
)
from shared.images.decode import ALLOWED_FORMATS, decode_image, open_image
from shared.images.fetch import Budget, check_bucket, fetch_s3, fetch_url
from shared.images.uploads import SCHEME as UPLOAD_SCHEME
from shared.images.uploads import UploadStore, upload_id_of
from shared.outbound.netguard import ForbiddenAddress, HostNotFound, UrlRefused, check_url
from shared.outbound.s3 import S3Location, parse_s3_uri

__all__ = ["ALLOWED_FORMATS", "Access", "decode_image", "fetch_image", "fetch_images", "load_image", "load_images",
           "validate_ref"]

DATA_URI = re.compile(r"^data:image/(?P<subtype>[a-z0-9.+-]+);base64,(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


@dataclass(frozen=True)
class Access:
    """What a job's refs may reach: its owner's uploads (looked up in `uploads`) and S3 buckets."""

    owner: str | None = None
    buckets: frozenset[str] = frozenset()
    uploads: UploadStore | None = None


NO_ACCESS = Access()


def validate_ref(ref: str, settings: Settings, access: Access = NO_ACCESS) -> None:
    """The API's check: the reference is well formed, within bounds and reachable by this caller."""
    kind = ref_kind(ref)
    if kind == "data":
        _decode_data_uri(ref, settings)
    elif kind == "url":
        _check_url(ref, settings)
    elif kind == "s3":
        check_bucket(_s3_location(ref).bucket, access.buckets, settings)
    elif kind == "upload":
        _uploads(access).size_for(_upload_id(ref), access.owner)
    else:
        _local_path(ref, settings, follow_links=False)


def load_image(ref: str, settings: Settings, access: Access = NO_ACCESS, budget: Budget | None = None) -> Image.Image:
    """Fetch and decode one image as RGB; raises an ImageError subclass (or InvalidImageRef) with a stable code."""
    return decode_image(fetch_image(ref, settings, access, budget), settings)


def fetch_image(ref: str, settings: Settings, access: Access = NO_ACCESS, budget: Budget | None = None) -> bytes:
    """One image's bytes, bounded, with its header read: format and size refused here as decoding would, and its
    pixels taken from the job's budget before anything is decoded."""
    budget = budget or Budget(settings)
    data = fetch_bytes(ref, settings, access, budget)
    header = open_image(data, settings)
    budget.take_pixels(header.width * header.height)
    return data


def load_images(refs: list[str], settings: Settings, access: Access = NO_ACCESS) -> list[Image.Image]:
    """Every image of a job, fetched and decoded a few at a time, their bytes and pixels bounded together. The
    first failing image (in the job's order) is the error; the others stop at their next chunk."""
    return _each(load_image, refs, settings, access)


def fetch_images(refs: list[str], settings: Settings, access: Access = NO_ACCESS) -> list[bytes]:
    """Every image of a job as checked bytes (`fetch_image`), a few at a time, bounded together like load_images."""
    return _each(fetch_image, refs, settings, access)


def _each(one, refs: list[str], settings: Settings, access: Access) -> list:
    budget = Budget(settings)
    if len(refs) == 1:
        return [one(refs[0], settings, access, budget)]
    with ThreadPoolExecutor(min(len(refs), settings.image_fetch_threads), "visionq-image") as pool:
        futures = [pool.submit(one, ref, settings, access, budget) for ref in refs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            budget.stop()
            for future in futures:
                future.cancel()
            raise


def held_bytes(ref: str, settings: Settings, access: Access) -> bytes:
    """The bytes of an image the server holds itself (an upload of `access.owner`, or a data URI), for the web
    console to show; InvalidImageRef for any other kind, which the console only links to and never fetches."""
    kind = ref_kind(ref)
    if kind == "upload":
        return _uploads(access).get(_upload_id(ref), access.owner)
    if kind == "data":
        return _decode_data_uri(ref, settings)
    raise InvalidImageRef("only uploads and data URIs are shown; other images are links")


def fetch_bytes(ref: str, settings: Settings, access: Access, budget: Budget) -> bytes:
    """The raw bytes a reference points at, bounded by settings.max_image_bytes and the job's budget."""
    kind = ref_kind(ref)
    if kind == "url":
        return fetch_url(ref, settings, budget)
    if kind == "s3":
        location = _s3_location(ref)
        check_bucket(location.bucket, access.buckets, settings)
        return fetch_s3(location, settings, budget)
    if kind == "upload":
        data = _uploads(access).get(_upload_id(ref), access.owner)
    elif kind == "data":
        data = _decode_data_uri(ref, settings)
    else:
        data = _read_file(_local_path(ref, settings, follow_links=True), settings)
    budget.take_bytes(len(data))
    return data


def ref_kind(ref: str) -> str:
    """"url", "s3", "upload", "data" or "path"; InvalidImageRef for any other scheme."""
    lowered = ref[:10].lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith(("https://", "http://")):
        return "url"
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.startswith(UPLOAD_SCHEME):
        return "upload"
    if SCHEME.match(ref):
        raise InvalidImageRef(f"unsupported image reference scheme: {ref.split(':', 1)[0]!r}")
    return "path"


def _check_url(url: str, settings: Settings) -> None:
    """The SSRF guard's submit-time check. A host that does not resolve now may later: the worker decides."""
    try:
        check_url(url, settings)
    except HostNotFound:
        return
    except ForbiddenAddress as exc:
        raise ImageForbiddenAddress(str(exc)) from None
    except UrlRefused as exc:
        raise InvalidImageRef(str(exc)) from None


def _s3_location(ref: str) -> S3Location:
    try:
        return parse_s3_uri(ref)
    except ValueError as exc:
        raise InvalidImageRef(str(exc)) from None


def _upload_id(ref: str) -> str:
    upload_id = upload_id_of(ref)
    if not UPLOAD_ID.match(upload_id):
        raise InvalidImageRef("not an upload ref this server gave")
    return upload_id


def _uploads(access: Access) -> UploadStore:
    if access.uploads is None:
        raise InvalidImageRef("upload:// refs are not available here")
    return access.uploads


def _decode_data_uri(ref: str, settings: Settings) -> bytes:
    match = DATA_URI.match(ref)
    if not match:
        raise InvalidImageRef("data URI must look like data:image/<type>;base64,<data>")
    payload = match.group("payload")
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise ImageTooLarge("inline image is larger than the byte bound")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageRef("data URI payload is not valid base64") from exc


def _local_path(ref: str, settings: Settings, follow_links: bool) -> Path:
    root = _resolved(settings.image_root)
    # The API checks the path as written (no file system calls on the hot path: `..` cannot escape); the worker
    # resolves links too, so that a link inside the root cannot point a job outside it.
    path = (root / ref).resolve() if follow_links else Path(os.path.normpath(root / ref))
    if not path.is_relative_to(root):
        raise InvalidImageRef("image path is outside the image root")
    return path


@lru_cache(maxsize=8)
def _resolved(root: Path) -> Path:
    return root.resolve()


def _read_file(path: Path, settings: Settings) -> bytes:
    try:
        size = path.stat().st_size
        if size > settings.max_image_bytes:
            raise ImageTooLarge(f"image file is {size} bytes, over the bound")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageNotFound("image file does not exist") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise ImageUnreadable("image file cannot be read") from exc
