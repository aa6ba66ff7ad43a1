"""Processor for Phi-3-vision, a transformers 5.x port of the checkpoint's remote `processing_phi3_v.py`.

Prompt layout (kept from the original): the prompt is split on `<|image_N|>` tags, every text chunk is
tokenized on its own with the tokenizer's default special tokens (so each chunk gets the BOS token a Llama
tokenizer adds), and each tag is replaced by `num_img_tokens[N - 1]` copies of the id `-N`. The model finds image
positions by `input_ids < 0`, in row-major order over the batch, and fills them with the images in order.

Batching (an addition): `text` may be a list of prompts. Images are numbered per prompt, as in the original
(each prompt uses `<|image_1|>` .. `<|image_k|>`), and `images` is one flat list consumed in prompt order: the
first prompt's k images, then the next prompt's, and so on. Each row is thus exactly what a single-prompt call
returns; rows are left-padded with the pad token and an attention mask of 0.
"""

from __future__ import annotations

import re

from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from worker.models.phi3v.image_processing_phi3_v import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


def image_tag_ids(prompt: str) -> list[int]:
    """The N of every `<|image_N|>` in `prompt`, in order of appearance."""
    return [int(tag.split("|")[1].split("_")[-1]) for tag in IMAGE_TAG.findall(prompt)]


def count_prompt_images(prompt: str) -> int:
    """How many images a prompt refers to; tags must be 1..k (repeats allowed), as the original asserts."""
    unique = sorted(set(image_tag_ids(prompt)))
    if unique != list(range(1, len(unique) + 1)):
        raise ValueError(f"image tags must be numbered 1..k within a prompt, got {unique} in {prompt!r}")
    return len(unique)


class Phi3VProcessor(ProcessorMixin):
    r"""
    Wraps a [`Phi3VImageProcessor`] and a (Llama) tokenizer.

    `__call__(text, images)` takes one prompt (identical output to the original) or a list of prompts (see the
    module docstring for how images are assigned) and returns `input_ids`, `attention_mask` and, with images,
    `pixel_values` and `image_sizes`. `num_crops` (an addition) overrides the image processor's for this call
    only, so that one processor serves jobs of different crop counts.
    """

    special_image_token = "<|image|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        # Kept for parity with the original, which falls back to it when an image processor has no counts.
        self.num_img_tokens = getattr(image_processor, "num_img_tokens", 144)

    def __call__(
        self,
        text: str | list[str],
        images: ImageInput | None = None,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        return_tensors: str | TensorType | None = TensorType.PYTORCH,
        num_crops: int | None = None,
    ) -> BatchFeature:
        options = {} if num_crops is None else {"num_crops": num_crops}
        if isinstance(text, str):
            return self._single(text, images, padding, truncation, max_length, return_tensors, options)
        return self._batch(list(text), images, padding, truncation, max_length, return_tensors, options)

    def _single(self, text, images, padding, truncation, max_length, return_tensors, options) -> BatchFeature:
        """One prompt, as the original: plain tokenizer call without images, expanded ids with them."""
        if images is None:
            encoded = self.tokenizer(
                text, return_tensors=return_tensors, padding=padding, truncation=truncation, max_length=max_length
            )
            return BatchFeature(data={**encoded})
        image_inputs = self.image_processor(images, return_tensors=return_tensors, **options)
        num_tokens = [int(n) for n in image_inputs["num_img_tokens"]]
        if count_prompt_images(text) != len(num_tokens):
            raise ValueError(f"the prompt has {count_prompt_images(text)} image tags but {len(num_tokens)} images")
        input_ids = [self.expand_prompt(text, num_tokens)]
        data = {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(input_ids[0])],
            "pixel_values": image_inputs["pixel_values"],
            "image_sizes": image_inputs["image_sizes"],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _batch(self, texts, images, padding, truncation, max_length, return_tensors, options) -> BatchFeature:
        """Several prompts, each expanded like a single call, then left-padded to a common length."""
        if truncation:
            # Cutting a prompt could split an image's token run, which the model cannot handle.
            raise ValueError("truncation is not supported for batched Phi-3-V prompts")
        per_prompt = [count_prompt_images(text) for text in texts]
        data = {}
        num_tokens = []
        if images is not None:
            image_inputs = self.image_processor(images, return_tensors=return_tensors, **options)
            num_tokens = [int(n) for n in image_inputs["num_img_tokens"]]
            data = {"pixel_values": image_inputs["pixel_values"], "image_sizes": image_inputs["image_sizes"]}
        if sum(per_prompt) != len(num_tokens):
            raise ValueError(f"the prompts have {sum(per_prompt)} images in all (per prompt: {per_prompt}), "
                             f"but {len(num_tokens)} images were given")
        rows, start = [], 0
        for text, count in zip(texts, per_prompt, strict=True):
            rows.append(self.expand_prompt(text, num_tokens[start:start + count]))
            start += count
        width = max(len(row) for row in rows)
        if padding == "max_length" and max_length:
            width = max(width, max_length)
        data["input_ids"] = [[self._pad_id()] * (width - len(row)) + row for row in rows]
        data["attention_mask"] = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def expand_prompt(self, text: str, num_tokens: list[int]) -> list[int]:
        """Token ids of one prompt with `<|image_N|>` replaced by `num_tokens[N - 1]` copies of `-N`."""
        chunks = [self.tokenizer(chunk).input_ids for chunk in IMAGE_TAG.split(text)]
        input_ids = list(chunks[0])
        for image_id, chunk in zip(image_tag_ids(text), chunks[1:], strict=True):
            input_ids += [-image_id] * num_tokens[image_id - 1]
            input_ids += chunk
        return input_ids

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to left-pad a batch with")
        return pad_id

    def calc_num_image_tokens(self, images: ImageInput) -> list[int]:
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    @property
    def special_image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.special_image_token)

    def get_special_image_token_id(self):
        return self.special_image_token_id

    def batch_decode(self, *args, **kwargs):
        """Passthrough to the tokenizer. Image ids (negative) must be removed first, as with the original."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Passthrough to the tokenizer. Image ids (negative) must be removed first, as with the original."""
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        return list(dict.fromkeys(names))

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The base class finds the image processor through AutoImageProcessor, which can't know this class
        # until a Phi-3-V config class exists to register it under; load both parts directly instead.
        image_processor = Phi3VImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]


__all__ = ["Phi3VProcessor"]
