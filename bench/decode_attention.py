"""The decode attention kernel alone (worker/paged_attention.py) on CUDA: time per layer and the bytes of keys and
values it reads per second, at the shapes of a full Phi-3-V decode step, as shipped and over a sweep of its launch
settings.

    python -m bench.decode_attention [--rows 256] [--tokens 830] [--warps 4,8] [--stages 2,3,4]
                                     [--kv-dtype bfloat16,float8_e4m3fn]

Phi-3-mini has 32 key/value heads of 96 dims: a row's token is 393 KB of cache over 32 layers, so a step at 256
rows of ~830 tokens reads ~83 GB. Against the H200's ~4.3 TB/s that is the decode step's floor. `--kv-dtype` also
times pools of another dtype (fp8: half the bytes; the kernel converts each block to the query's dtype), for the
question whether fp8 keys and values would be worth their change of outputs; visionq's pools are the model's dtype.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from worker import paged_attention
from worker.blocks import BLOCK_SIZE, blocks_for


def case(rows: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype):
    """Query, pools, a table of blocks drawn at random over the pool, and every row `tokens` long."""
    columns = blocks_for(tokens) + 1
    blocks = rows * columns + 1
    keys = torch.randn(blocks, BLOCK_SIZE, heads, head_dim, device="cuda", dtype=dtype).to(kv_dtype)
    values = torch.randn(blocks, BLOCK_SIZE, heads, head_dim, device="cuda", dtype=dtype).to(kv_dtype)
    table = (torch.randperm(blocks - 1, device="cuda")[:rows * columns] + 1).view(rows, columns).to(torch.int32)
    seen = torch.full((rows,), tokens, dtype=torch.int32, device="cuda")
    query = torch.randn(rows, heads, 1, head_dim, device="cuda", dtype=dtype)
    return query, keys, values, table, seen


def timed(fn, repeats: int = 50) -> float:
    """Milliseconds a call, by CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def launch(query, keys, values, table, seen, warps: int, stages: int):
    """The kernel with one split a row (as at many rows) and the given launch settings."""
    scale = query.shape[-1] ** -0.5
    return lambda: paged_attention._triton_decode(query, keys, values, table, seen, scale, splits=1,
                                                  num_warps=warps, num_stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=830)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--kv-dtype", default="bfloat16",
                        help="comma-separated pool dtypes, e.g. bfloat16,float8_e4m3fn")
    args = parser.parse_args()
    dtype = torch.bfloat16
    for kv_dtype in (getattr(torch, name) for name in args.kv_dtype.split(",")):
        tensors = case(args.rows, args.tokens, args.heads, args.head_dim, dtype, kv_dtype)
        read = 2 * args.rows * args.tokens * args.heads * args.head_dim * kv_dtype.itemsize
        shipped = timed(lambda tensors=tensors: paged_attention.decode_attention(*tensors, args.head_dim ** -0.5))
        print(f"{args.rows} rows x {args.tokens} tokens, {args.heads} heads x {args.head_dim}, pools {kv_dtype}: "
              f"as shipped {shipped * 1000:.1f} us a layer, {read / shipped / 1e6:.0f} GB/s; x{args.layers} layers "
              f"{shipped * args.layers:.1f} ms a step", flush=True)
        for warps, stages in itertools.product(map(int, args.warps.split(",")), map(int, args.stages.split(","))):
            ms = timed(launch(*tensors, warps, stages))
            print(f"  warps {warps}, stages {stages}: {ms * 1000:.1f} us, {read / ms / 1e6:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
