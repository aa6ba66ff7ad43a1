"""Decoding untrusted image bytes into RGB, hardened.

- Only these formats are even tried: PNG, JPEG (and MPO, the multi-picture JPEG of cameras), WebP, GIF, BMP and
  TIFF (scans); Pillow is told so, so no other format's parser ever reads the bytes.
- The pixel count is checked from the header before anything is decoded: over settings.max_image_pixels is a
  decompression bomb; a side over settings.max_image_side is too large.
- Truncated files are an error (Pillow's LOAD_TRUNCATED_IMAGES stays off).
- EXIF orientation is applied; palette, alpha, CMYK, 16-bit and other modes become 8-bit RGB (transparency over
  white). An animated image (GIF, WebP, PNG) gives its first frame.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.config import Settings
from shared.errors import ImageDecompressionBomb, ImageTooLarge, ImageUnreadable, ImageUnsupportedFormat

ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# Pillow's plugin names to try: MPO is found by the JPEG plugin.
OPEN_FORMATS = tuple(f for f in ALLOWED_FORMATS if f != "MPO")
WIDE_INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def configure_pillow(settings: Settings) -> None:
    """Give Pillow's own bomb check (process-wide) the settings' bound; called once as a process starts. The
    header check below applies the settings in any case; this makes Pillow agree with it."""
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels


def open_image(data: bytes, settings: Settings) -> Image.Image:
    """Read only the header: the format and the size, checked against the allowlist and the bounds."""
    if not data:
        raise ImageUnreadable("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except UnidentifiedImageError:
        raise ImageUnsupportedFormat(f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecompressionBomb(f"the image has more than {settings.max_image_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageUnreadable("the image header could not be read") from None
    check_size(image, settings)
    return image


def check_size(image: Image.Image, settings: Settings) -> None:
    width, height = image.size
    if width * height > settings.max_image_pixels:
        raise ImageDecompressionBomb(f"the image is {width}x{height}, over {settings.max_image_pixels} pixels")
    if max(width, height) > settings.max_image_side:
        raise ImageTooLarge(f"the image is {width}x{height}, a side over {settings.max_image_side} pixels")
    if width < 1 or height < 1:
        raise ImageUnreadable(f"the image is {width}x{height}")


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Decode bytes into an 8-bit RGB image (first frame), refusing what the module docstring lists."""
    image = open_image(data, settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecompressionBomb("the image has too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ImageUnreadable("the image is truncated or corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: wide integers scaled (not clipped), transparency composited over white."""
    if image.mode in WIDE_INTEGER_MODES:
        # 16-bit samples: scale 0..65535 to 0..255 (a plain convert would clip nearly everything to white).
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
