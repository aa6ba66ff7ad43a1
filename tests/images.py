"""Images the tests make."""

import numpy as np
from PIL import Image


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise of the given size, the same for the same seed."""
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
