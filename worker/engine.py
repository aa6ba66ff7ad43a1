"""A generic Hugging Face engine: one processor and one image-text-to-text model, loaded once per process."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import worker.models.phi3v  # noqa: F401  (registers the native Phi-3-vision port with the Auto classes)
from shared.config import Settings
from worker import kernels
from worker.decoding import Completion, Decoder, Prompt
from worker.encoder import Encoder

log = logging.getLogger(__name__)

_loads = 0  # how many times this process has loaded a model: the worker reports it, tests check it stays 1


@dataclass(frozen=True)
class Generation:
    """What one greedy generation produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    inference_ms: float


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
    """Builds prompts, runs the processor, owns the model and its batched greedy decoder, decodes tokens."""

    def __init__(self, settings: Settings):
        global _loads
        started = time.perf_counter()
        self.model_id = settings.model
        self.device = resolve_device(settings.device)
        if self.device.type == "cuda":
            # The CPU side is the processor, run by several task threads at once: one intra-op thread each, or
            # their thread pools oversubscribe the cores and delay the GPU thread's kernel launches.
            torch.set_num_threads(1)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        remote = settings.trust_remote_code
        self.encoder = Encoder(self.model_id, remote, self.dtype)
        self.config, self.processor = self.encoder.config, self.encoder.processor
        self.takes_num_crops = self.encoder.takes_num_crops
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_id, dtype=self.dtype, attn_implementation=resolve_attention(settings.attn_implementation,
                                                                                   self.device),
            trust_remote_code=remote,
        ).to(self.device).eval()
        self.fused = kernels.fuse(self.model, settings.gemv_max_rows) if settings.fused_kernels else []
        pad = self.processor.tokenizer.pad_token_id
        self.decoder = Decoder(self.model, _eos_ids(self.model), pad if pad is not None else 0,
                               use_graphs=settings.cuda_graphs, kv_budget_bytes=_kv_budget(settings, self.device),
                               prefill_tokens=settings.prefill_tokens, kv_blocks=settings.kv_blocks,
                               kv_dtype=torch.float8_e4m3fn if settings.kv_cache_dtype == "fp8" else None)
        _loads += 1
        log.info("loaded %s on %s (%s) in %.1f s", self.model_id, self.device, self.dtype,
                 time.perf_counter() - started)

    def prompt(self, n_images: int, question: str) -> str:
        """The prompt text: the Phi-3 cookbook string, or the same turn through the processor's chat template."""
        return self.encoder.prompt(n_images, question)

    def prepare(self, images: list[Image.Image], question: str, max_new_tokens: int,
                num_crops: int | None = None) -> Prompt:
        """The processor's tensors for one prompt, on the CPU, in this thread (the worker's task threads use
        worker.preprocess.Preprocessor, which may run it in another process). `num_crops`: Phi-3-vision only."""
        return Prompt(self.encoder.encode(images, question, num_crops), max_new_tokens)

    def text(self, tokens: list[int]) -> str:
        return self.processor.decode(tokens, skip_special_tokens=True)

    def generate(self, images: list[Image.Image], question: str, max_new_tokens: int,
                 num_crops: int | None = None) -> Generation:
        """Greedy generation for one job, alone (the worker batches jobs through worker.batcher instead)."""
        started = time.perf_counter()
        done: list[Completion] = []
        self.decoder.generate([self.prepare(images, question, max_new_tokens, num_crops)],
                              lambda _row, c: done.append(c))
        return self.generation(done[0], (time.perf_counter() - started) * 1000)

    def generation(self, completion: Completion, inference_ms: float) -> Generation:
        return Generation(self.text(completion.tokens), completion.prompt_tokens, len(completion.tokens),
                          inference_ms)


def _kv_budget(settings: Settings, device: torch.device) -> int:
    """Bytes for KV caches: a share of the GPU memory left once the weights are in, or a fixed amount on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * settings.kv_cache_fraction)
    return settings.cpu_kv_cache_mb * 1024 * 1024


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [] if eos is None else [eos]


_engine: Engine | None = None


def get_engine(settings: Settings) -> Engine:
    """The process's one engine, loaded on first use (the worker calls this when its process starts)."""
    global _engine
    if _engine is None:
        _engine = Engine(settings)
    return _engine
