"""Image processor for Phi-3-vision, a transformers 5.x port of the checkpoint's remote `image_processing_phi3_v.py`.

The HD transform (from InternLM-XComposer2-4KHD) resizes an image so its long side is `scale * 336` pixels, where
`scale` is the largest integer for which `scale * ceil(scale / aspect_ratio) <= num_crops`, pads the short side
with white to a multiple of 336, and cuts the result into 336x336 crops. The model gets a 336x336 bicubic
down-scale of the whole HD image (the "global" image) followed by the crops, zero-padded to `num_crops + 1`.

Numerics follow the original exactly: PIL bilinear resize, `ToTensor` (uint8 / 255 in float32), per-channel
`(x - mean) / std`, then `torch.nn.functional.interpolate(..., mode="bicubic")` for the global image. The
original did this with torchvision; torchvision is not a dependency here, so the same operations are written
with PIL and torch directly (what torchvision runs for PIL inputs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput
from transformers.processing_utils import ImagesKwargs, Unpack

CROP_SIZE = 336


class Phi3VImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_crops (`int`, *optional*):
        Upper bound on the number of 336x336 sub-images per image (the checkpoint's `hd_num`).
    num_img_tokens (`int`, *optional*):
        Tokens per 336x336 crop after the model's 2x2 merge (144). Kept because the checkpoint's config has it and
        the original processor reads it.
    """

    num_crops: int
    num_img_tokens: int


def hd_target_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) after the HD resize, before padding; expects width >= height."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = int(scale * CROP_SIZE)
    # Same float expression as the original (new_w / ratio, not new_w * h / w) so rounding matches.
    new_height = int(new_width / ratio)
    return new_width, new_height


def vertical_padding(height: int) -> tuple[int, int]:
    """(top, bottom) white rows that bring `height` to a multiple of 336, centred as in the original."""
    target = int(np.ceil(height / CROP_SIZE) * CROP_SIZE)
    top = int((target - height) / 2)
    return top, target - height - top


def hd_transformed_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of the padded HD image, computed without touching pixels."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_width, new_height = hd_target_size(width, height, num_crops)
    new_height += sum(vertical_padding(new_height))
    return (new_height, new_width) if transposed else (new_width, new_height)


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize and white-pad an RGB PIL image so both sides are multiples of 336 (long side = scale * 336)."""
    # The original works on the landscape orientation and transposes back, so portrait images pad left/right.
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_width, new_height = hd_target_size(image.width, image.height, num_crops)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    top, bottom = vertical_padding(new_height)
    padded = Image.new("RGB", (new_width, new_height + top + bottom), (255, 255, 255))
    padded.paste(image, (0, top))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def num_image_tokens(height: int, width: int) -> int:
    """Image tokens the model emits for an HD image of this (padded) size.

    144 per crop and for the global image, one newline token per 12-token row (12 rows per crop row plus 12 for
    the global image), and one separator between sub-images and the global image. Operator order kept from the
    original (`h // 336 * w // 336`); it equals crops_h * crops_w because both sides are multiples of 336.
    """
    return int((height // CROP_SIZE * width // CROP_SIZE + 1) * 144 + 1 + (height // CROP_SIZE + 1) * 12)


def to_normalized_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """torchvision's ToTensor + Normalize: (3, H, W) float32, computed in the same order for identical bits."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(mean, dtype=pixels.dtype)[:, None, None]
    std = torch.as_tensor(std, dtype=pixels.dtype)[:, None, None]
    return pixels.sub_(mean).div_(std)


def write_crops(hd_image: torch.Tensor, slots: torch.Tensor) -> None:
    """Into `slots` (num_crops + 1, 3, 336, 336): the bicubic global view first, then the crops in row-major order,
    then zeros for the crops this image lacks. Written in place: the concatenation, padding and stacking this
    replaced copied every pixel three more times (num_crops 16: 9.4 -> 4.9 ms an image on a 2-core CPU)."""
    _, height, width = hd_image.shape
    rows, cols = height // CROP_SIZE, width // CROP_SIZE
    slots[0] = torch.nn.functional.interpolate(
        hd_image.unsqueeze(0).float(), size=(CROP_SIZE, CROP_SIZE), mode="bicubic"
    )[0]
    crops = hd_image.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
    slots[1:1 + rows * cols].view(rows, cols, 3, CROP_SIZE, CROP_SIZE).copy_(crops)
    slots[1 + rows * cols:].zero_()


class Phi3VImageProcessor(PilBackend):
    r"""
    Phi-3-vision image processor (HD transform + CLIP normalisation).

    Returns a `BatchFeature` with:
    - `pixel_values`: `(num_images, num_crops + 1, 3, 336, 336)`, global image first, zero-padded crops;
    - `image_sizes`: `[height, width]` of each image after the HD transform (multiples of 336);
    - `num_img_tokens`: how many image tokens the model expects for each image.

    `num_crops` defaults to 1 like the original class; Phi-3-vision-128k-instruct's config sets 16 and
    Phi-3.5-vision's 4.
    """

    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_convert_rgb = True
    num_crops = 1
    num_img_tokens = 144
    valid_kwargs = Phi3VImageProcessorKwargs
    # image_sizes is listed too because the model's forward needs it (the original listed pixel_values only).
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, **kwargs: Unpack[Phi3VImageProcessorKwargs]):
        # The checkpoint's auto_map points at remote code this class replaces; keeping it would make
        # AutoImageProcessor(trust_remote_code=True) load the old files from a saved copy.
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)

    def preprocess(self, images: ImageInput, **kwargs: Unpack[Phi3VImageProcessorKwargs]) -> BatchFeature:
        return super().preprocess(images, **kwargs)

    def process_image(self, image: ImageInput, input_data_format=None, **kwargs) -> Image.Image:
        """Bring one input to an RGB PIL image, the form the HD transform (PIL resize) works on."""
        if not isinstance(image, Image.Image):
            # The original accepted PIL only; arrays/tensors are converted (floats in [0, 1] are rescaled).
            image = to_pil_image(image, input_data_format=input_data_format)
        # A plain convert (alpha dropped, not composited on white) is what the original did on transformers 4.4x.
        return image.convert("RGB")

    def _preprocess(
        self,
        images: list[Image.Image],
        num_crops: int,
        image_mean,
        image_std,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        hd_images = [to_normalized_tensor(hd_transform(image, num_crops), image_mean, image_std) for image in images]
        image_sizes = [[int(image.shape[1]), int(image.shape[2])] for image in hd_images]
        pixel_values = torch.empty((len(hd_images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE),
                                   dtype=torch.get_default_dtype())
        for image, slots in zip(hd_images, pixel_values, strict=True):
            write_crops(image, slots)
        data = {
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "num_img_tokens": [num_image_tokens(height, width) for height, width in image_sizes],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def calc_num_image_tokens(self, images: ImageInput, num_crops: int | None = None) -> list[int]:
        """Image-token count per image, from the sizes alone (same result as running the HD transform)."""
        num_crops = self.num_crops if num_crops is None else num_crops
        images = self._prepare_image_like_inputs(images)
        return [self.calc_num_image_tokens_from_image_size(image.width, image.height, num_crops) for image in images]

    def calc_num_image_tokens_from_image_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image-token count for an image of `width` x `height` pixels."""
        num_crops = self.num_crops if num_crops is None else num_crops
        new_width, new_height = hd_transformed_size(width, height, num_crops)
        return num_image_tokens(new_height, new_width)


__all__ = ["Phi3VImageProcessor"]
