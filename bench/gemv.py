"""The decode step's matrix products at a few rows on CUDA: cuBLAS (torch.nn.functional.linear) against
worker/gemv.py's kernel, per Phi-3-mini projection, as shipped and over a sweep of its settings.

    python -m bench.gemv [--rows 1,2,4,8] [--sweep]

Each case is timed as a decode step meets it: a CUDA graph of one call per layer over 32 distinct weights (so
that no weight is read from L2), replayed; the lm_head once. Prints microseconds a call, the weight bytes read per
second, and the kernel's time over cuBLAS's; then the sum over one step's products.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from worker import gemv

# Phi-3-mini: (name, out features, in features, layers)
SHAPES = (("qkv_proj", 9216, 3072, 32), ("o_proj", 3072, 3072, 32), ("gate_up_proj", 16384, 3072, 32),
          ("down_proj", 3072, 8192, 32), ("lm_head", 32064, 3072, 1))
SWEEP = {"block_n": (1, 2, 4, 8), "block_k": (512, 1024, 2048, 4096), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3)}


def timed_graph(calls, repeats: int = 20) -> float:
    """Milliseconds a replay of a graph of `calls`, by CUDA events, after a warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def case(out_features: int, in_features: int, layers: int, rows: int):
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(layers)]
    x = torch.randn(rows, 1, in_features, device="cuda", dtype=torch.bfloat16)
    return x, weights


def per_call_us(fn, x, weights) -> float:
    return timed_graph([lambda w=w: fn(x, w) for w in weights]) * 1000 / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--sweep", action="store_true", help="also time every setting of SWEEP, print the best")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = [dict(zip(SWEEP, values, strict=True)) for values in itertools.product(*SWEEP.values())]
    for rows in (int(r) for r in args.rows.split(",")):
        totals = {"cublas": 0.0, "kernel": 0.0, "best": 0.0}
        by_setting: dict[int, float] = {}  # index in settings -> that setting's time over one step's products
        print(f"rows {rows}:")
        for name, out_features, in_features, layers in SHAPES:
            x, weights = case(out_features, in_features, layers, rows)
            reference = F.linear(x, weights[0])
            error = (gemv.gemv(x, weights[0]).float() - reference.float()).abs().max().item()
            bytes_per_call = out_features * in_features * 2
            cublas = per_call_us(F.linear, x, weights)
            shipped = per_call_us(gemv.gemv, x, weights)
            best, best_setting = shipped, "shipped"
            if args.sweep:
                for index, setting in enumerate(settings):
                    # accumulators a thread holds: past ~128 registers the kernel spills
                    if gemv.triton.next_power_of_2(rows) * setting["block_n"] * setting["block_k"] > \
                            128 * 32 * setting["num_warps"]:
                        continue
                    us = per_call_us(lambda a, w, s=setting: gemv.gemv(a, w, **s), x, weights)
                    by_setting[index] = by_setting.get(index, 0.0) + us * layers
                    if us < best:
                        best, best_setting = us, setting
            for key, us in (("cublas", cublas), ("kernel", shipped), ("best", best)):
                totals[key] += us * layers
            print(f"  {name:<13} cuBLAS {cublas:7.1f} us {bytes_per_call / cublas / 1e6:4.2f} TB/s | kernel "
                  f"{shipped:7.1f} us {bytes_per_call / shipped / 1e6:4.2f} TB/s ({shipped / cublas:.2f}x) | best "
                  f"{best:7.1f} us ({best / cublas:.2f}x) {best_setting} | max |diff| {error:.3g}")
            del weights
            torch.cuda.empty_cache()
        print(f"  one step's products: cuBLAS {totals['cublas'] / 1000:.3f} ms, kernel {totals['kernel'] / 1000:.3f} "
              f"ms ({totals['kernel'] / totals['cublas']:.2f}x), best settings {totals['best'] / 1000:.3f} ms")
        for us, index in sorted((us, i) for i, us in by_setting.items())[:5]:
            print(f"  one setting for every shape: {settings[index]} {us / 1000:.3f} ms ({us / totals['cublas']:.2f}x)")


if __name__ == "__main__":
    main()
