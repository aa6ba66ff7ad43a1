"""Decode attention over a KV cache kept in fixed-size blocks: one query token per row, each row its own length.

The decoder's block cache (worker/blocks.py) holds each layer's keys and values as [blocks, block_size, kv_heads,
head_dim]; a row's tokens live in the blocks its row of the block table names, in order, and `seen[row]` of them
count. `decode_attention` reads only those tokens: no row pays for its neighbours' lengths, unlike attention over
rows padded to the longest.

On CUDA (and on the CPU in Triton's interpreter, TRITON_INTERPRET=1, for tests) a Triton kernel does it, one
program per (row, query head): it walks the row's blocks with an online softmax in fp32. Its launch has fixed
shapes and reads the table and lengths from device tensors, so a CUDA graph captures it once per row count. Without
Triton (CPU builds of torch) a torch reference gathers each row's blocks into a contiguous view and runs SDPA with a
length mask; tests/unit/worker/test_paged_attention.py compares the two.

`blocks_attention(model)` makes the model's attention layers call `decode_attention` for the block (transformers'
attention interface, switched per attention module's config), over the table and lengths it was entered with (not
a keyword of the forward: not every transformers version hands unknown keywords down to attention).
"""

from __future__ import annotations

import os

import torch
from transformers import AttentionInterface

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLEMENTATION = "visionq_blocks"  # not "paged|...": transformers gives that prefix a meaning of its own
_current: list[tuple[torch.Tensor, torch.Tensor]] = []  # (table, seen) of the decode step running now


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, seen_ptr, out_ptr, scale, group, head_dim,
                       q_row_stride, q_head_stride, kv_block_stride, kv_token_stride, kv_head_stride,
                       table_row_stride, out_row_stride, out_head_stride,
                       BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        kv_head = (head // group).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        inside = d < head_dim
        q = tl.load(q_ptr + row * q_row_stride + head * q_head_stride + d, mask=inside, other=0.0).to(tl.float32)
        seen = tl.load(seen_ptr + row).to(tl.int32)
        t = tl.arange(0, BLOCK)
        top = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(0, seen, BLOCK):
            block = tl.load(table_ptr + row * table_row_stride + start // BLOCK).to(tl.int64)
            valid = start + t < seen
            offsets = block * kv_block_stride + t[:, None] * kv_token_stride + kv_head * kv_head_stride + d[None, :]
            keep = valid[:, None] & inside[None, :]
            k = tl.load(k_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            p = tl.exp(scores - new_top)
            alpha = tl.exp(top - new_top)
            v = tl.load(v_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            top = new_top
        out = acc / total
        tl.store(out_ptr + row * out_row_stride + head * out_head_stride + d, out.to(out_ptr.dtype.element_ty),
                 mask=inside)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                     seen: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of query [rows, heads, 1, head_dim] over each row's first `seen[row]` cached tokens (keys and
    values [blocks, block_size, kv_heads, head_dim], table [rows, columns] of block ids); [rows, 1, heads,
    head_dim], as transformers' attention functions return it."""
    if triton is not None and (query.is_cuda or INTERPRETED):
        return _triton_decode(query, keys, values, table, seen, scale)
    return reference_decode(query, keys, values, table, seen, scale)


def _triton_decode(query, keys, values, table, seen, scale):
    rows, heads, _, head_dim = query.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    out = torch.empty((rows, 1, heads, head_dim), dtype=query.dtype, device=query.device)
    _decode_kernel[(rows, heads)](
        query, keys, values, table, seen, out, scale, heads // kv_heads, head_dim,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        table.stride(0), out.stride(0), out.stride(2),
        BLOCK=block_size, HEAD_DIM=triton.next_power_of_2(head_dim), num_warps=4)
    return out


def reference_decode(query, keys, values, table, seen, scale):
    """The same attention in torch: each row's blocks gathered into one view, the slots past its length masked.
    The view is as long as the longest row (read from `seen`: eager only, a CUDA graph cannot capture it)."""
    rows, heads, _, head_dim = query.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    columns = -(-int(seen.max()) // block_size)
    ids = table[:, :columns].long()

    def gather(pool):
        view = pool[ids].reshape(rows, columns * block_size, kv_heads, head_dim).transpose(1, 2)
        return view.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else view

    mask = torch.arange(columns * block_size, device=query.device) < seen.view(-1, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, gather(keys), gather(values),
                                                           attn_mask=mask.view(rows, 1, 1, -1), scale=scale)
    return out.transpose(1, 2)


def _blocks_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_kwargs):
    """transformers' attention-function signature; `key` and `value` are the layer's block pools (the cache's
    `update` returns them), read through the table of the step that entered `blocks_attention`."""
    if not _current:
        raise RuntimeError("block attention runs only within blocks_attention (the decoder's decode step)")
    table, seen = _current[-1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(query, key, value, table, seen, scale), None


AttentionInterface.register(IMPLEMENTATION, _blocks_attention_forward)


class blocks_attention:
    """Within the block, the model's attention layers use `decode_attention` over `table` and `seen` (their configs
    name it), whatever attention the model was loaded with; the prefill keeps the model's own."""

    def __init__(self, model, table: torch.Tensor, seen: torch.Tensor):
        self.tensors = (table, seen)
        configs = {id(m.config): m.config for m in model.modules()
                   if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "o_proj")}
        if not configs:
            raise ValueError(f"no attention layers found in {type(model).__name__} for block attention")
        self.configs = list(configs.values())
        self.saved: list[str | None] = []

    def __enter__(self):
        self.saved = [config._attn_implementation_internal for config in self.configs]
        for config in self.configs:
            config._attn_implementation_internal = IMPLEMENTATION
        _current.append(self.tensors)
        return self

    def __exit__(self, *_exc):
        _current.pop()
        for config, saved in zip(self.configs, self.saved, strict=True):
            config._attn_implementation_internal = saved
