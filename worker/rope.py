"""Long-RoPE per row: each row of a batch rotates with the factors that its own length selects.

transformers' long-RoPE (Phi-3's "longrope"/"su") picks short or long factors once per forward, from the largest
position in the whole batch: right for the original code, which ran one prompt at a time, wrong for a batch, where
one row past `original_max_position_embeddings` would switch every row to the long factors and a job's result would
depend on its neighbours. `per_row_rope(model)` swaps, for the block, each long-RoPE module's forward for one that
chooses per row, with no Python branch on a tensor (so a CUDA graph can capture it, whatever the lengths).
"""

from __future__ import annotations

import types

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

LONG_ROPE_TYPES = ("longrope",)


def long_rope_modules(model) -> list[torch.nn.Module]:
    """The rotary modules of `model` whose frequencies depend on the sequence length (long-RoPE)."""
    return [m for m in model.modules() if getattr(m, "rope_type", None) in LONG_ROPE_TYPES
            and hasattr(m, "original_inv_freq")]


def original_max_positions(module) -> int:
    return int(module.config.rope_parameters["original_max_position_embeddings"])


def _per_row_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    """transformers' rotary forward, with `inv_freq` chosen per row from that row's largest position (the same
    elementwise product, so a row's cos and sin equal what a batch of one would get)."""
    seq_len = position_ids.amax(-1, keepdim=True)[..., None] + 1  # [rows, 1, 1]
    short, long = self.original_inv_freq.to(x.device, torch.float), self._long_inv_freq.to(x.device, torch.float)
    inv_freq = torch.where(seq_len > self._original_max, long, short)  # [rows, 1, dim / 2]
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class per_row_rope:
    """Within the block, the model's long-RoPE modules choose their factors row by row (nothing to do for models
    with other rotary types: their frequencies do not depend on the length, or on the batch)."""

    def __init__(self, model):
        self.modules = long_rope_modules(model)
        for module in self.modules:
            if not hasattr(module, "_long_inv_freq"):
                original = original_max_positions(module)
                long, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config, module.original_inv_freq.device,
                                                                 seq_len=original + 1)
                module._long_inv_freq, module._original_max = long, original

    def __enter__(self):
        for module in self.modules:
            module.forward = types.MethodType(_per_row_forward, module)
        return self

    def __exit__(self, *_exc):
        for module in self.modules:
            del module.forward
