"""Decode attention over a KV cache kept in fixed-size blocks: one query token per row, each row its own length.

The decoder's block cache (worker/blocks.py) holds each layer's keys and values as [blocks, block_size, kv_heads,
head_dim]; a row's tokens live in the blocks its row of the block table names, in order, and `seen[row]` of them
count. `decode_attention` reads only those tokens: no row pays for its neighbours' lengths, unlike attention over
rows padded to the longest.

On CUDA (and on the CPU in Triton's interpreter, TRITON_INTERPRET=1, for tests) a Triton kernel does it, one
program per (row, kv head), split over a few programs per row when the rows are few: it walks the row's blocks
with an online softmax in fp32, its products as tensor-core dots. Its launch has fixed
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

FP8 = torch.float8_e4m3fn  # VISIONQ_KV_CACHE_DTYPE=fp8
# Its largest finite value: a larger key or value is clamped to it first. This project's CPU torch 2.13 saturates
# a plain cast by itself, Triton's interpreter wraps around (1000 -> 256); other builds are not checked here.
FP8_MAX = 448.0

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
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, seen_ptr, out_ptr, part_ptr, stat_ptr, scale, group, head_dim,
                       q_row_stride, q_head_stride, kv_block_stride, kv_token_stride, kv_head_stride,
                       table_row_stride, out_row_stride, out_head_stride,
                       BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                       PRECISION: tl.constexpr):
        """One program per (row, kv head, split): the query heads of that kv head (padded to GROUP >= 16 rows, so
        that both products run as tensor-core dots and Triton pipelines the block loads) over the split's share of
        the row's blocks, with an online softmax in fp32. With one split it writes the output; with more, its
        unnormalized sum and its (max, total) for `_merge_kernel`."""
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        g = tl.arange(0, GROUP)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * group + g
        q_mask = (g < group)[:, None] & (d < head_dim)[None, :]
        q = tl.load(q_ptr + row * q_row_stride + heads[:, None] * q_head_stride + d[None, :], mask=q_mask, other=0.0)
        seen = tl.load(seen_ptr + row).to(tl.int32)
        blocks = tl.cdiv(seen, BLOCK)
        share = tl.cdiv(blocks, SPLITS)
        first, last = split * share, tl.minimum(blocks, (split + 1) * share)
        t = tl.arange(0, BLOCK)
        top = tl.full([GROUP], float("-inf"), tl.float32)
        total = tl.zeros([GROUP], dtype=tl.float32)
        acc = tl.zeros([GROUP, HEAD_DIM], dtype=tl.float32)
        for column in range(first, last):
            block = tl.load(table_ptr + row * table_row_stride + column).to(tl.int64)
            valid = column * BLOCK + t < seen
            offsets = block * kv_block_stride + t[:, None] * kv_token_stride + kv_head * kv_head_stride + d[None, :]
            keep = valid[:, None] & (d < head_dim)[None, :]
            # In the query's dtype: a no-op for pools in the model's dtype; fp8 pools (VISIONQ_KV_CACHE_DTYPE=fp8)
            # widen here, block by block.
            k = tl.load(k_ptr + offsets, mask=keep, other=0.0).to(q.dtype)
            v = tl.load(v_ptr + offsets, mask=keep, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP, BLOCK]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            p = tl.exp(scores - new_top[:, None])
            alpha = tl.exp(top - new_top)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        if SPLITS == 1:
            out = acc / total[:, None]
            tl.store(out_ptr + row * out_row_stride + heads[:, None] * out_head_stride + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:
            # part: [rows, heads, SPLITS, HEAD_DIM] fp32; stat: [rows, heads, SPLITS, 2] fp32 (max, total)
            n_heads = tl.num_programs(1) * group
            slot = (row * n_heads + heads) * SPLITS + split
            tl.store(part_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < group)[:, None])
            tl.store(stat_ptr + slot * 2, top, mask=g < group)
            tl.store(stat_ptr + slot * 2 + 1, total, mask=g < group)


    @triton.jit
    def _merge_kernel(part_ptr, stat_ptr, out_ptr, heads, head_dim, out_row_stride, out_head_stride,
                      SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One program per (row, head): the splits' partial sums into one, each weighted by exp(its max - the
        overall max) (a split with no tokens has max -inf: weight 0). One kernel where torch took eight, a
        decode step's ~0.5 ms at a few rows on the H200 (they run once per layer)."""
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        slot = (row * heads + head) * SPLITS + s
        top = tl.load(stat_ptr + slot * 2)
        total = tl.load(stat_ptr + slot * 2 + 1)
        weight = tl.exp(top - tl.max(top, axis=0))
        acc = tl.load(part_ptr + slot[:, None] * HEAD_DIM + d[None, :])
        merged = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(out_ptr + row * out_row_stride + head * out_head_stride + d, merged.to(out_ptr.dtype.element_ty),
                 mask=d < head_dim)

    @triton.jit
    def _write_kernel(key_ptr, value_ptr, key_pool_ptr, value_pool_ptr, slots_ptr, kv_heads, head_dim,
                      key_row_stride, key_head_stride, value_row_stride, value_head_stride, pool_slot_stride,
                      pool_head_stride, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SATURATE: tl.constexpr):
        """One program per row: its new key and value, every kv head, copied to its slot of the layer's pools (in
        the pools' dtype; fp8 saturating at +-SATURATE when it is not 0)."""
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        inside = (h < kv_heads) & (d < head_dim)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        to = slot * pool_slot_stride + h * pool_head_stride + d
        key = tl.load(key_ptr + row * key_row_stride + h * key_head_stride + d, mask=inside)
        value = tl.load(value_ptr + row * value_row_stride + h * value_head_stride + d, mask=inside)
        if SATURATE:
            key = tl.clamp(key.to(tl.float32), -SATURATE, SATURATE)
            value = tl.clamp(value.to(tl.float32), -SATURATE, SATURATE)
        tl.store(key_pool_ptr + to, key.to(key_pool_ptr.dtype.element_ty), mask=inside)
        tl.store(value_pool_ptr + to, value.to(value_pool_ptr.dtype.element_ty), mask=inside)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                     seen: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of query [rows, heads, 1, head_dim] over each row's first `seen[row]` cached tokens (keys and
    values [blocks, block_size, kv_heads, head_dim], table [rows, columns] of block ids); [rows, 1, heads,
    head_dim], as transformers' attention functions return it."""
    if triton is not None and (query.is_cuda or INTERPRETED):
        return _triton_decode(query, keys, values, table, seen, scale)
    return reference_decode(query, keys, values, table, seen, scale)


def write_kv(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Each row's new key and value ([rows, kv_heads, 1, head_dim], any strides but the last) into `slots` of the
    layer's pools ([blocks, block_size, kv_heads, head_dim]): one launch for both (on the CPU, two index_copy_).
    A decode step runs it once a layer; at one row, the two copies' launches were ~5% of the step on the H200."""
    flat = (-1, *keys.shape[2:])  # [blocks * block_size, kv_heads, head_dim]
    rows, kv_heads, _, head_dim = key_states.shape
    strided = key_states.stride(-1) == value_states.stride(-1) == 1 and keys.is_contiguous() and values.is_contiguous()
    if triton is None or not (keys.is_cuda or INTERPRETED) or not strided:
        store(keys.view(flat), slots, key_states[:, :, 0])
        store(values.view(flat), slots, value_states[:, :, 0])
        return
    _write_kernel[(rows,)](key_states, value_states, keys, values, slots, kv_heads, head_dim,
                           key_states.stride(0), key_states.stride(1), value_states.stride(0), value_states.stride(1),
                           keys.stride(1), keys.stride(2), HEADS=triton.next_power_of_2(kv_heads),
                           HEAD_DIM=triton.next_power_of_2(head_dim),
                           SATURATE=FP8_MAX if keys.dtype == FP8 else 0.0, num_warps=4)


def store(pool: torch.Tensor, index: torch.Tensor, states: torch.Tensor) -> None:
    """`pool.index_copy_(0, index, states)` in the pool's dtype: fp8 pools get saturated values, copied as bytes
    (torch has no fp8 index_copy_)."""
    if states.dtype == pool.dtype:
        pool.index_copy_(0, index, states)
    elif pool.dtype == FP8:
        pool.view(torch.uint8).index_copy_(0, index, states.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8))
    else:
        pool.index_copy_(0, index, states.to(pool.dtype))


def splits_for(rows: int, kv_heads: int, columns: int) -> int:
    """How many programs share a row's blocks: enough programs to fill the GPU (~132 SMs, a few each) when the
    rows are few (one row alone would walk its blocks on 32 programs), one when they are many."""
    splits = 1
    while rows * kv_heads * splits < 1024 and splits < 16 and splits * 2 <= columns:
        splits *= 2
    return splits


def _triton_decode(query, keys, values, table, seen, scale, splits: int | None = None, num_warps: int = 4,
                   num_stages: int = 3):
    rows, heads, _, head_dim = query.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    splits = splits or splits_for(rows, kv_heads, table.shape[1])
    head_pad = triton.next_power_of_2(head_dim)
    out = torch.empty((rows, 1, heads, head_dim), dtype=query.dtype, device=query.device)
    part = stat = out
    if splits > 1:
        part = torch.empty((rows, heads, splits, head_pad), dtype=torch.float32, device=query.device)
        stat = torch.empty((rows, heads, splits, 2), dtype=torch.float32, device=query.device)
    _decode_kernel[(rows, kv_heads, splits)](
        query, keys, values, table, seen, out, part, stat, scale, group, head_dim,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        table.stride(0), out.stride(0), out.stride(2),
        BLOCK=block_size, HEAD_DIM=head_pad, GROUP=max(16, triton.next_power_of_2(group)), SPLITS=splits,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_kernel[(rows, heads)](part, stat, out, heads, head_dim, out.stride(0), out.stride(2),
                                     SPLITS=splits, HEAD_DIM=head_pad, num_warps=1)
    return out


def reference_decode(query, keys, values, table, seen, scale):
    """The same attention in torch: each row's blocks gathered into one view, the slots past its length masked.
    The view is as long as the longest row (read from `seen`: eager only, a CUDA graph cannot capture it)."""
    rows, heads, _, head_dim = query.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    columns = -(-int(seen.max()) // block_size)
    ids = table[:, :columns].long()

    def gather(pool):
        view = pool[ids].reshape(rows, columns * block_size, kv_heads, head_dim).transpose(1, 2).to(query.dtype)
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
