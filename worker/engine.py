"""A generic Hugging Face engine: one processor and one image-text-to-text model, loaded once per process."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, StoppingCriteriaList

import worker.models.phi3v  # noqa: F401  (registers the native Phi-3-vision port with the Auto classes)
from shared.config import Settings
from shared.task_specs import chat_messages, phi3_prompt

log = logging.getLogger(__name__)

# Checkpoints prompted with the Phi-3 cookbook string rather than a chat template.
PHI3_PROMPT_MODEL_TYPES = frozenset({"phi3_v"})

_loads = 0  # how many times this process has loaded a model: the worker reports it, tests check it stays 1


@dataclass(frozen=True)
class Generation:
    """What one greedy generation produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    inference_ms: float


class StopWhen(StoppingCriteria):
    """Ends generation for every row once a callback says so; checked after each decode step."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str, device: torch.device) -> str:
    """`auto` is FlashAttention 2 on CUDA when the flash-attn package is installed, else PyTorch's SDPA."""
    if name != "auto":
        return name
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"


def load_count() -> int:
    """How many models this process has loaded."""
    return _loads


class Engine:
    """Builds prompts, runs the processor and greedy `generate`, and decodes the new tokens."""

    def __init__(self, settings: Settings):
        global _loads
        started = time.perf_counter()
        self.model_id = settings.model
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        remote = settings.trust_remote_code
        self.config = AutoConfig.from_pretrained(self.model_id, trust_remote_code=remote)
        self.processor = AutoProcessor.from_pretrained(self.model_id, trust_remote_code=remote)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_id, dtype=self.dtype, attn_implementation=resolve_attention(settings.attn_implementation,
                                                                                   self.device),
            trust_remote_code=remote,
        ).to(self.device).eval()
        _loads += 1
        log.info("loaded %s on %s (%s) in %.1f s", self.model_id, self.device, self.dtype,
                 time.perf_counter() - started)

    def prompt(self, n_images: int, question: str) -> str:
        """The prompt text: the Phi-3 cookbook string, or the same turn through the processor's chat template."""
        if self.config.model_type in PHI3_PROMPT_MODEL_TYPES or not getattr(self.processor, "chat_template", None):
            return phi3_prompt(n_images, question)
        return self.processor.apply_chat_template(
            chat_messages(n_images, question), add_generation_prompt=True, tokenize=False
        )

    def inputs(self, images: list[Image.Image], question: str):
        """The processor's tensors for one prompt, on the model's device and dtype."""
        encoded = self.processor(text=self.prompt(len(images), question), images=images, return_tensors="pt")
        return encoded.to(self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], question: str, max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """Greedy generation for one job; `should_stop` is asked between decode steps (cancellation)."""
        started = time.perf_counter()
        inputs = self.inputs(images, question)
        prompt_len = inputs["input_ids"].shape[1]
        criteria = StoppingCriteriaList([StopWhen(should_stop)] if should_stop else [])
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     stopping_criteria=criteria)
        new_tokens = output[0, prompt_len:]
        text = self.processor.decode(new_tokens, skip_special_tokens=True)
        return Generation(text, prompt_len, self._completion_length(new_tokens),
                          (time.perf_counter() - started) * 1000)

    def _completion_length(self, new_tokens: torch.Tensor) -> int:
        """Generated tokens up to and including the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [],
                               device=new_tokens.device)
        hits = torch.isin(new_tokens, eos_ids).nonzero()
        return int(hits[0, 0]) + 1 if len(hits) else int(new_tokens.numel())


_engine: Engine | None = None


def get_engine(settings: Settings) -> Engine:
    """The process's one engine, loaded on first use (the worker calls this when its process starts)."""
    global _engine
    if _engine is None:
        _engine = Engine(settings)
    return _engine
