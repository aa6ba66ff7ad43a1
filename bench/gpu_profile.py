"""Where a batch's GPU time goes, on the real-shape Phi-3-vision (a probe of the decoder, not of the system).

    python -m bench.gpu_profile [--num-crops 4,16] [--out DIR]

For each num_crops, with the worker's own `Decoder` (no queue, no API): a whole batch (prefill and 128 graphed
decode steps) at a few row counts; the prefill of one chunk split into vision tower and text, with its kernels
grouped (matrix products, attention, the rest); the graphed decode step under each SDPA backend; and whether a
prefill on a low-priority stream overlaps a decode on a high-priority one (the wall time of both, against the sum
of each alone). Full profiler tables go to --out.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.phi3v_gpu import CONFIG, image, synced
from cli.tiny_model import build_phi3v_tokenizer
from worker import kernels
from worker.decoding import Decoder, DecodeSlot, Prompt, collate, length_bucket
from worker.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from worker.prompts import phi3_prompt

NEW_TOKENS = 128


def build(config_path: Path, device: str):
    config = Phi3VConfig.from_dict(json.loads(config_path.read_text()))
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


def make_prompts(processor, count: int) -> list[Prompt]:
    prompts = []
    for i in range(count):
        encoded = processor(text=phi3_prompt(1, "Describe this image in detail."), images=[image(336, 336, seed=i)],
                            return_tensors="pt")
        prompts.append(Prompt({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in encoded.items()},
                              NEW_TOKENS))
    return prompts


def kernel_groups(prof) -> dict[str, float]:
    """Self device time (ms) of the kernels, per family."""
    from torch.autograd import DeviceType

    groups: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        ms = getattr(event, "self_device_time_total", 0) / 1000
        name = event.key.lower()
        if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk")):
            group = "matmul"
        elif any(k in name for k in ("flash", "fmha", "attention", "efficient", "cudnn")):
            group = "attention"
        elif "memcpy" in name or "memset" in name:
            group = "memcpy"
        else:
            group = "elementwise/other"
        groups[group] = groups.get(group, 0.0) + ms
    return groups


def profile(fn, out: Path | None, name: str) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if out:
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
                break
            except (AttributeError, KeyError, RuntimeError):
                continue
    return kernel_groups(prof)


def fmt(groups: dict[str, float]) -> str:
    total = sum(groups.values())
    return ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))


@torch.inference_mode()
def whole_batches(decoder: Decoder, prompts: list[Prompt], rows_list: list[int]) -> None:
    for rows in rows_list:
        batch = prompts[:rows]
        decoder.generate(batch, lambda _r, _c: None)  # captures this bucket's graph
        started = synced()
        stats = decoder.generate(batch, lambda _r, _c: None)
        total = synced() - started
        print(f"  batch {rows:>3}: prefill {stats.prefill_s:.2f} s ({stats.prefill_s / rows * 1000:.1f} ms/row), "
              f"decode {stats.decode_s:.2f} s ({stats.decode_s / stats.steps * 1000:.1f} ms/step, graphed "
              f"{stats.graphed}), {rows / total:.1f} rows/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)
        decoder.slots.clear()
        torch.cuda.empty_cache()


@torch.inference_mode()
def prefill_parts(model, decoder: Decoder, prompts: list[Prompt], out: Path) -> None:
    length = max(p.length for p in prompts)
    rows = max(1, decoder.prefill_tokens // length)
    started = time.perf_counter()
    inputs = collate([p.inputs for p in prompts[:rows]], length, decoder.pad_id)
    collate_s = time.perf_counter() - started
    started = time.perf_counter()
    inputs = {k: v.to("cuda", dtype=torch.bfloat16 if v.is_floating_point() else None) for k, v in inputs.items()}
    h2d_s = synced() - started
    tower = model.model.vision_embed_tokens

    def vision():
        tower(inputs["pixel_values"], inputs["image_sizes"])

    def forward():
        mask = inputs["attention_mask"]
        model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)

    for fn in (vision, forward):
        fn()
    timings = {}
    for name, fn in (("vision", vision), ("forward", forward)):
        started = synced()
        for _ in range(3):
            fn()
        timings[name] = (synced() - started) / 3
    print(f"  one prefill chunk: {rows} rows x {length} tokens; collate {collate_s * 1000:.0f} ms, "
          f"copy to GPU {h2d_s * 1000:.0f} ms; vision tower {timings['vision'] * 1000:.0f} ms "
          f"({timings['vision'] / rows * 1000:.1f} ms/row); whole forward {timings['forward'] * 1000:.0f} ms "
          f"({timings['forward'] / rows * 1000:.1f} ms/row)", flush=True)
    print(f"    vision kernels: {fmt(profile(vision, out, f'vision-{length}'))}", flush=True)
    print(f"    forward kernels: {fmt(profile(forward, out, f'forward-{length}'))}", flush=True)
    for chunk in (8192, 32768):
        decoder.prefill_tokens, saved = chunk, decoder.prefill_tokens
        batch = prompts[:max(1, 65536 // length)]
        decoder.generate(batch[:2], lambda _r, _c: None)
        started = synced()
        slot = decoder._prefill(list(batch), length, length_bucket(length + NEW_TOKENS), len(batch), None)
        seconds = synced() - started
        print(f"    prefill of {len(batch)} rows in chunks of {chunk} tokens: {seconds / len(batch) * 1000:.1f} ms/row",
              flush=True)
        del slot
        decoder.prefill_tokens = saved
        decoder.slots.clear()
        torch.cuda.empty_cache()


@torch.inference_mode()
def decode_backends(model, decoder: Decoder, prompts: list[Prompt], out: Path) -> DecodeSlot:
    length = max(p.length for p in prompts)
    total = length_bucket(length + NEW_TOKENS)
    slot = decoder._prefill(list(prompts), length, total, len(prompts), None)
    kv = slot.kv
    results = {}
    for name, backends in (("default", None), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("math", [SDPBackend.MATH])):
        trial = DecodeSlot(model, kv, total)
        try:
            if backends is None:
                trial.capture()
            else:
                with sdpa_kernel(backends):
                    trial.capture()
        except RuntimeError as exc:
            results[name] = f"failed: {str(exc)[:80]}"
            continue
        trial.reset(length)
        trial.mask[:, :, :, :length] = True
        trial.run()
        started = synced()
        for _ in range(32):
            trial.run()
        results[name] = f"{(synced() - started) / 32 * 1000:.2f} ms"
        del trial
    print(f"  graphed decode step, {len(prompts)} rows, cache {total}: " +
          ", ".join(f"{k} {v}" for k, v in results.items()), flush=True)
    eager = DecodeSlot(model, kv, total)
    eager.reset(length)
    eager.mask[:, :, :, :length] = True
    print(f"    eager step kernels: {fmt(profile(eager.step, out, f'decode-{len(prompts)}-{total}'))}", flush=True)
    return slot


@torch.inference_mode()
def overlap(model, decoder: Decoder, slot: DecodeSlot, prompts: list[Prompt], prefill_rows: int) -> None:
    """Decode graph replays on a high-priority stream while another thread prefills on a low-priority one."""
    length = max(p.length for p in prompts)
    high = torch.cuda.Stream(priority=-1)
    low = torch.cuda.Stream(priority=0)
    batch = prompts[:prefill_rows]

    def decode():
        with torch.cuda.stream(high):
            for _ in range(NEW_TOKENS):
                slot.run()
            high.synchronize()

    def prefill():
        with torch.inference_mode(), torch.cuda.stream(low):
            for start in range(0, len(batch), max(1, decoder.prefill_tokens // length)):
                chunk = batch[start:start + max(1, decoder.prefill_tokens // length)]
                inputs = collate([p.inputs for p in chunk], length, decoder.pad_id)
                inputs = {k: v.to("cuda", dtype=torch.bfloat16 if v.is_floating_point() else None)
                          for k, v in inputs.items()}
                mask = inputs["attention_mask"]
                model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)
            low.synchronize()

    timings = {}
    for name, fns in (("decode", [decode]), ("prefill", [prefill]), ("both", [decode, prefill])):
        for _attempt in range(2):
            slot.reset(length)
            slot.mask[:, :, :, :length] = True
            torch.cuda.synchronize()
            started = time.perf_counter()
            threads = [threading.Thread(target=fn) for fn in fns]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            timings[name] = time.perf_counter() - started
    print(f"  overlap: decode {slot.kv.rows} rows x {NEW_TOKENS} steps alone {timings['decode']:.2f} s; prefill "
          f"{prefill_rows} rows alone {timings['prefill']:.2f} s; sum {timings['decode'] + timings['prefill']:.2f} s; "
          f"both at once {timings['both']:.2f} s", flush=True)


def attempt(fn, *args):
    """One part failing (out of memory, say) must not cost the parts after it."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 (a probe reports and goes on)
        print(f"  {fn.__name__} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-crops", default="4,16")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default="/tmp/gpu-profile")
    parser.add_argument("--parts", default="batches,prefill,decode,overlap")
    parser.add_argument("--fused", default="both", choices=["off", "on", "both"],
                        help="the Triton elementwise kernels (worker/kernels.py): without, with, or without then with")
    args = parser.parse_args()
    out = Path(args.out)
    for label in ("eager", "fused"):
        (out / label).mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    started = synced()
    model = build(Path(args.config), "cuda")
    print(f"built in {synced() - started:.1f} s", flush=True)
    free, _ = torch.cuda.mem_get_info()
    for fused in {"off": [False], "on": [True], "both": [False, True]}[args.fused]:
        if fused:
            print(f"fused kernels: {', '.join(kernels.fuse(model))}", flush=True)
        for crops in [int(c) for c in args.num_crops.split(",")]:
            probe(model, crops, parts, out, int(free * 0.75), "fused" if fused else "eager")


def probe(model, crops: int, parts: list[str], out: Path, kv_budget: int, label: str) -> None:
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=crops), build_phi3v_tokenizer())
    rows_list = [64, 128] if crops <= 4 else [16, 32, 48]
    prompts = make_prompts(processor, max(rows_list))
    print(f"num_crops={crops} ({label} elementwise kernels): prompt {prompts[0].length} tokens", flush=True)
    decoder = Decoder(model, [], 0, use_graphs=True, kv_budget_bytes=kv_budget)
    if "batches" in parts:
        attempt(whole_batches, decoder, prompts, rows_list)
    if "prefill" in parts:
        attempt(prefill_parts, model, decoder, prompts, out / label)
    if "decode" in parts or "overlap" in parts:
        rows = rows_list[-2] if crops <= 4 else 24
        slot = attempt(decode_backends, model, decoder, prompts[:rows], out / label)
        if "overlap" in parts and slot is not None:
            attempt(overlap, model, decoder, slot, prompts, rows)
        del slot
    decoder.slots.clear()
    decoder.arena = None
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
