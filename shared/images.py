"""Image references: parse and bound them (the API's cheap check), then fetch and decode them (the worker).

This issue's refs are `data:image/...;base64,` URIs and file paths under settings.image_root; other schemes
come later behind the same two functions, `validate_ref` and `load_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps

from shared.config import Settings
from shared.errors import ImageNotFound, ImageTooLarge, ImageUnreadable, InvalidImageRef

DATA_URI = re.compile(r"^data:image/(?P<subtype>[a-z0-9.+-]+);base64,(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)
# Formats Pillow decodes that cameras, screenshots and scanners produce; everything else is refused.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference: either inline bytes or a local file."""

    data: bytes | None = None
    path: Path | None = None


def parse_ref(ref: str, settings: Settings, follow_links: bool = False) -> ImageRef:
    """Parse and bound a reference without reading any file; raises InvalidImageRef or ImageTooLarge.
    `follow_links` also resolves symbolic links before the containment check (the worker, about to read)."""
    if ref.startswith("data:"):
        return ImageRef(data=_decode_data_uri(ref, settings))
    if SCHEME.match(ref):
        raise InvalidImageRef(f"unsupported image reference scheme: {ref.split(':', 1)[0]!r}")
    return ImageRef(path=_local_path(ref, settings, follow_links))


def validate_ref(ref: str, settings: Settings) -> None:
    """The API's check: the reference is well formed and within bounds."""
    parse_ref(ref, settings)


def load_image(ref: str, settings: Settings) -> Image.Image:
    """Fetch and decode one image as RGB; raises an ImageError subclass with a stable code."""
    parsed = parse_ref(ref, settings, follow_links=True)
    data = parsed.data if parsed.data is not None else _read_file(parsed.path, settings)
    return decode_image(data, settings)


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Decode bytes into an RGB image, refusing unknown formats and images over the pixel bound."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageUnreadable(f"unsupported image format: {image.format}")
            if image.width * image.height > settings.max_image_pixels:
                raise ImageTooLarge(f"image has {image.width}x{image.height} pixels, over the bound")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge("image has too many pixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageUnreadable("image could not be decoded") from exc
    return ImageOps.exif_transpose(image).convert("RGB")


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
