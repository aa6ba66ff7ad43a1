"""Phi-3-vision of the real shape (random weights) on one GPU: load, batch of 16 mixed prompts, batched vs
sequential greedy tokens, prefill and decode speed at batch 1 and 16.

    python -m bench.phi3v_gpu [--num-crops 4] [--new-tokens 64] [--dir /tmp/phi3v-real]

The model is the checkpoint's config.json (tests/data/phi3_vision_128k_config.json: Phi-3-mini decoder, 32
layers, hidden 3072, longrope; CLIP ViT-L/14-336) with random bf16 weights, saved once with save_pretrained and
timed loading back through AutoModelForImageTextToText, SDPA attention. The tokenizer is the tiny Phi-3-vision
one (its ids are valid for the 32,064-token vocabulary; text content does not matter with random weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from cli.tiny_model import build_phi3v_tokenizer
from worker.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from worker.prompts import phi3_prompt

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "phi3_vision_128k_config.json"
QUESTIONS = {
    "describe": ("Describe this image in detail.", [(336, 336)]),
    "compare": ("What is the difference between these images?", [(500, 300), (300, 420)]),
    "ocr": ("Extract all the text in this image, in reading order.", [(640, 200)]),
}


def image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def prompts(count: int) -> list[tuple[str, list[Image.Image]]]:
    """`count` prompts cycling through describe, compare (two sizes) and OCR, each with its own images."""
    out = []
    for i in range(count):
        question, sizes = list(QUESTIONS.values())[i % 3]
        out.append((phi3_prompt(len(sizes), question),
                    [image(w, h, seed=i * 7 + k) for k, (w, h) in enumerate(sizes)]))
    return out


def build_and_save(folder: Path, config_path: Path, device: str) -> float:
    """Random weights of the configured shape written with save_pretrained; returns seconds."""
    started = time.perf_counter()
    config = Phi3VConfig.from_dict(json.loads(config_path.read_text()))
    with torch.device(device):
        model = Phi3VForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    # Hand the memory back: a worker started next sizes its KV pool from the GPU's free memory (the caching
    # allocator's ~17 GB from this build had cost the first measured run 11 of its 256 rows).
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.inference_mode()
def run(model, processor, batch: list[tuple[str, list[Image.Image]]], new_tokens: int):
    """Prefill seconds, decode tokens/s (all rows), generated tokens per row."""
    texts = [text for text, _ in batch]
    images = [img for _, imgs in batch for img in imgs]
    inputs = processor(texts if len(texts) > 1 else texts[0], images, return_tensors="pt").to(model.device, model.dtype)
    started = synced()
    model(**inputs, use_cache=False)
    prefill_s = synced() - started
    started = synced()
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            return_dict_in_generate=True, output_scores=True)
    total_s = synced() - started
    decode_tps = len(batch) * (new_tokens - 1) / max(total_s - prefill_s, 1e-9)
    top2 = torch.stack(output.scores, 1).float().topk(2, dim=-1).values  # (rows, steps, 2)
    gaps = (top2[..., 0] - top2[..., 1]).tolist()
    tokens = output.sequences[:, inputs["input_ids"].shape[1]:].tolist()
    return prefill_s, decode_tps, tokens, inputs["input_ids"].shape, gaps


def agreement(batched: list[list[int]], sequential: list[list[int]]) -> list[int]:
    """For each row, how many leading tokens batched and sequential greedy decoding share."""
    lengths = []
    for a, b in zip(batched, sequential, strict=True):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        lengths.append(same)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dir", default="/tmp/phi3v-real")
    parser.add_argument("--config", default=str(CONFIG), help="a smaller config.json for a CPU dry run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    folder = Path(args.dir)
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"build + save_pretrained (random bf16 weights): {build_and_save(folder, Path(args.config), device):.1f} s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()  # as worker/engine.py does
    print(f"load (from_pretrained, safetensors -> cuda): {synced() - started:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"rope {model.config.rope_parameters.get('rope_type')}")
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=args.num_crops), build_phi3v_tokenizer())
    batch = prompts(16)
    run(model, processor, batch[:1], 4)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    singles = [run(model, processor, [p], args.new_tokens) for p in batch]
    prefill1, tps1 = statistics.median(s[0] for s in singles), statistics.median(s[1] for s in singles)
    prefill16, tps16, batched, shape, _ = run(model, processor, batch, args.new_tokens)
    same = agreement(batched, [s[2][0] for s in singles])
    # Where a row first differs, how close were the two best logits when that prompt ran alone?
    gaps_at_split = [singles[row][4][0][step] for row, step in enumerate(same) if step < args.new_tokens]
    print(f"num_crops={args.num_crops}, batch input_ids {list(shape)} (left-padded), {args.new_tokens} new tokens")
    print(f"batch 1 : prefill {prefill1 * 1000:.0f} ms (median of 16 prompts), decode {tps1:.1f} tokens/s")
    print(f"batch 16: prefill {prefill16 * 1000:.0f} ms, decode {tps16:.1f} tokens/s "
          f"({tps16 / tps1:.1f}x batch 1)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"batched vs sequential greedy ({args.dtype}), leading tokens equal per row: min {min(same)}, "
          f"median {statistics.median(same)}, rows fully equal {sum(s == args.new_tokens for s in same)}/16")
    all_gaps = [gap for single in singles for gap in single[4][0]]
    if gaps_at_split:
        print(f"top-1/top-2 logit gap where rows split: max {max(gaps_at_split):.3f}; over all sequential steps: "
              f"median {statistics.median(all_gaps):.3f}")


if __name__ == "__main__":
    main()
