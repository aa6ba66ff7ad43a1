"""Images the tests make."""

import numpy as np
from PIL import Image


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise of the given size, the same for the same seed."""
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The image saved in a format, as bytes."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(width: int = 8, height: int = 6, color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "PNG")


def bomb_png(side: int) -> bytes:
    """A small file that declares side x side pixels: a 1-bit image of zeros compresses about 1000 to 1."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def animated_gif() -> bytes:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK


def png_16bit(value: int = 32_896) -> bytes:
    """A 16-bit greyscale PNG, every sample `value` (out of 65535)."""
    return encode(Image.new("I;16", (12, 12), value), "PNG")


def transparent_palette_png() -> bytes:
    """A palette PNG whose every pixel is index 0, made fully transparent by the tRNS chunk."""
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    return encode(image, "PNG", transparency=0)


def rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF orientation (6) says to turn it a quarter: upright it is 20x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif.tobytes())
