"""A lone prompt's prefill with and without worker/lone_prefill.py's graph, on the real-shape Phi-3-vision.

    python -m bench.lone_prefill [--num-crops 4,16] [--trials 20]
    python -m bench.lone_prefill --model-dir /tmp/tiny-phi3v   # a CPU dry run (no graphs: both run eagerly)

Two decoders of the same model (KV by blocks, graphs on): one prefills a prompt alone as chunks do, one through its
length bucket's LonePrefill. Each trial admits one prompt into each, in turn, and frees the row; prints the
median (min..max) of `Decoder.admit` per prompt after 3 warm-up trials, and whether both gave the same first token.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.gpu_profile import CONFIG, build, load, make_prompts, phi3v_processor
from bench.phi3v_gpu import synced
from worker import kernels
from worker.decoding import Decoder

WARM_UP = 3


@torch.inference_mode()
def admit_alone(decoder: Decoder, prompt) -> int:
    """Prefill one prompt into a free row, free it again; its first token."""
    decoder.admit([(0, prompt)])
    index = next(i for i, row in enumerate(decoder.rows) if row is not None)
    first = decoder.rows[index].tokens[0]
    decoder.release([index])
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-crops", default="4,16")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--model-dir", default="", help="a saved Phi-3-V checkpoint (e.g. a tiny one) instead")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.model_dir:
        model, _ = load(args.model_dir, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    else:
        model = build(Path(CONFIG), "cuda" if cuda else "cpu")
    if cuda:
        print(f"fused kernels: {', '.join(kernels.fuse(model))}")
    for crops in (int(c) for c in args.num_crops.split(",")):
        prompts = make_prompts(model, phi3v_processor(crops), 2, 8)
        decoders = {name: Decoder(model, [], 0, use_graphs=cuda, kv_budget_bytes=8 << 30, kv_blocks=True,
                                  lone_prefill=lone) for name, lone in (("as a chunk", False), ("lone prefill", True))}
        for decoder in decoders.values():
            decoder.plan(prompts[0].need, 4)
        times: dict[str, list[float]] = {name: [] for name in decoders}
        firsts: dict[str, list[int]] = {name: [] for name in decoders}
        for trial in range(WARM_UP + args.trials):
            for name, decoder in decoders.items():
                started = synced()
                firsts[name].append(admit_alone(decoder, prompts[trial % len(prompts)]))
                if trial >= WARM_UP:
                    times[name].append((synced() - started) * 1000)
        lone = decoders["lone prefill"]
        print(f"num_crops {crops}, prompt {prompts[0].length} tokens: admit of one prompt, median of {args.trials}: "
              + "; ".join(f"{name} {statistics.median(v):.1f} ms ({min(v):.1f}..{max(v):.1f})"
                          for name, v in times.items())
              + f"; graphed buckets {[b for b, p in lone.lones.items() if p.graph is not None]}; "
              f"same first tokens: {firsts['as a chunk'] == firsts['lone prefill']}", flush=True)


if __name__ == "__main__":
    main()
