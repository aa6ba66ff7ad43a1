"""The processor side of one model (no weights): its prompt format and its processor, in the model's dtype. The
same code runs in the worker's task threads and in its preprocessing processes (worker/encoder_pool.py), so a job's
tensors are the same either way."""

from __future__ import annotations

import inspect

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

import worker.models.phi3v  # noqa: F401  (registers the native Phi-3-vision port with the Auto classes)
from shared.config import Settings
from shared.errors import NumCropsUnsupported
from shared.images.decode import decode_image
from worker.prompts import chat_messages, phi3_prompt

# Checkpoints prompted with the Phi-3 cookbook string rather than a chat template.
PHI3_PROMPT_MODEL_TYPES = frozenset({"phi3_v"})


class Encoder:
    """The processor side of one model (no weights): its prompt format and its processor, in the model's dtype."""

    def __init__(self, model_id: str, trust_remote_code: bool, dtype: torch.dtype):
        self.model_id, self.dtype = model_id, dtype
        self.config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        # Phi-3-vision's processor (the port, worker/models/phi3v) takes a crop count per call.
        self.takes_num_crops = "num_crops" in inspect.signature(self.processor.__call__).parameters

    def prompt(self, n_images: int, question: str) -> str:
        """The prompt text: the Phi-3 cookbook string, or the same turn through the processor's chat template."""
        if self.config.model_type in PHI3_PROMPT_MODEL_TYPES or not getattr(self.processor, "chat_template", None):
            return phi3_prompt(n_images, question)
        return self.processor.apply_chat_template(
            chat_messages(n_images, question), add_generation_prompt=True, tokenize=False
        )

    def encode(self, images: list[Image.Image], question: str, num_crops: int | None) -> dict[str, torch.Tensor]:
        """The processor's tensors for one prompt, on the CPU. `num_crops` (None: the processor's own) is for
        Phi-3-vision's processor only."""
        options = {}
        if num_crops is not None:
            if not self.takes_num_crops:  # the API let it through: VISIONQ_NUM_CROPS_MODELS names this model
                raise NumCropsUnsupported(f"this worker's model ({self.model_id}) does not take num_crops")
            options["num_crops"] = num_crops
        encoded = self.processor(text=self.prompt(len(images), question), images=images, return_tensors="pt",
                                 **options)
        # Pixels in the model's dtype already: half the bytes for the GPU thread to batch and copy (same rounding).
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in encoded.items()}

    def encode_bytes(self, blobs: list[bytes], question: str, num_crops: int | None,
                     settings: Settings) -> dict[str, torch.Tensor]:
        """`encode` of images still as bytes, decoded within the settings' bounds (shared/images/decode.py: its
        errors keep their image codes)."""
        return self.encode([decode_image(blob, settings) for blob in blobs], question, num_crops)
