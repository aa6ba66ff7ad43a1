"""Where a batch's GPU time goes, on the real-shape Phi-3-vision (a probe of the decoder, not of the system).

    python -m bench.gpu_profile [--num-crops 4,16] [--out DIR]
    python -m bench.gpu_profile --model /tmp/tiny-llava --device cpu --rows 2,4 --new-tokens 8   # a smoke run
    python -m bench.gpu_profile --kv-blocks off,on --parts batches,mixed,decode   # rows of one length vs blocks

For each num_crops, with the worker's own `Decoder` (no queue, no API; no end-of-sequence ids, so every row runs
its --new-tokens):
- batches: `Decoder.generate` of a whole batch at a few row counts (all rows join at once, so this is the old
  static batch): prefill time per row, decode time per step (graphed on CUDA), rows/s.
- prefill: one prefill chunk split into vision tower and whole forward, with its kernels grouped (matrix products,
  attention, the rest); then `Decoder.admit` of a batch into a layout's free rows at a few prefill chunk sizes.
- mixed: `Decoder.generate` of 2 x --mixed-rows (default: the largest row count) prompts whose max_new_tokens are
  log-uniform in --lengths (seeded), at most that many rows at once: rows join as others end (the decoder alone).
- decode: with rows admitted, the decode step of those rows (`DecodeStep`, captured in a CUDA graph on CUDA) under
  each SDPA backend, and the kernels of one eager step. The rows' state is put back after each backend, so each
  times the same positions.
- overlap (CUDA only): whether a prefill on a low-priority stream overlaps the graphed decode step on a
  high-priority one (the wall time of both, against the sum of each alone). The decoder itself runs admit and step
  on one thread, one after the other; this asks whether running them side by side would pay. Its prefill is a
  plain forward (its own cache), not `admit`: the arena's rows are busy decoding.
--kv-blocks runs everything once per KV cache: rows of one length (off) and blocks (on, worker/blocks.py; its
decode step attends with its own kernel, so the SDPA backends do not apply).
Full profiler tables go to --out. On the CPU (--device cpu) the same parts run eagerly (no graphs; the kernels
grouped are CPU operators; the SDPA backends are what the CPU has); the overlap needs CUDA streams and is skipped.
--model loads a saved checkpoint (cli/tiny_model.py builds tiny ones) instead of the real-shape random Phi-3-V.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import threading
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.phi3v_gpu import CONFIG, image, synced
from cli.tiny_model import build_phi3v_tokenizer
from worker import kernels
from worker.decoding import BlockDecodeStep, Decoder, DecodeStep, Prompt, collate
from worker.encoder import PHI3_PROMPT_MODEL_TYPES
from worker.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from worker.prompts import chat_messages, phi3_prompt

QUESTION = "Describe this image in detail."
BACKENDS = (("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
            ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
            ("math", [SDPBackend.MATH]))


def build(config_path: Path, device: str):
    config = Phi3VConfig.from_dict(json.loads(config_path.read_text()))
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


def load(path: str, device: str, dtype: torch.dtype):
    """A saved checkpoint and its processor, loaded as the worker loads them (Phi-3-V is registered with the Auto
    classes by the import of worker.models.phi3v above)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), AutoProcessor.from_pretrained(path)


def prompt_text(model, processor) -> str:
    """The worker's prompt (worker/engine.py): Phi-3's cookbook string, or the processor's chat template."""
    if model.config.model_type in PHI3_PROMPT_MODEL_TYPES or not getattr(processor, "chat_template", None):
        return phi3_prompt(1, QUESTION)
    return processor.apply_chat_template(chat_messages(1, QUESTION), add_generation_prompt=True, tokenize=False)


def make_prompts(model, processor, count: int, new_tokens: int) -> list[Prompt]:
    dtype, text = model.dtype, prompt_text(model, processor)
    prompts = []
    for i in range(count):
        encoded = processor(text=text, images=[image(336, 336, seed=i)], return_tensors="pt")
        prompts.append(Prompt({k: v.to(dtype) if v.is_floating_point() else v for k, v in encoded.items()},
                              new_tokens))
    return prompts


def on_device(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(model.device, dtype=model.dtype if v.is_floating_point() else None) for k, v in inputs.items()}


def kernel_groups(prof, cuda: bool) -> dict[str, float]:
    """Self time (ms) of the kernels (CUDA) or operators (CPU), per family."""
    from torch.autograd import DeviceType

    groups: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU):
            continue
        us = getattr(event, "self_device_time_total", 0) if cuda else event.self_cpu_time_total
        name = event.key.lower()
        if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk", "aten::mm", "aten::addmm",
                                   "aten::bmm")):
            group = "matmul"
        elif any(k in name for k in ("flash", "fmha", "attention", "efficient", "cudnn")):
            group = "attention"
        elif any(k in name for k in ("memcpy", "memset", "aten::copy_")):
            group = "memcpy"
        else:
            group = "elementwise/other"
        groups[group] = groups.get(group, 0.0) + us / 1000
    return groups


def profile(fn, out: Path | None, name: str, cuda: bool) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=activities) as prof:
        fn()
        synced()
    if out:
        for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
            try:
                (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
                break
            except (AttributeError, KeyError, RuntimeError):
                continue
    return kernel_groups(prof, cuda)


def fmt(groups: dict[str, float]) -> str:
    total = sum(groups.values()) or 1.0
    return ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))


def peak_memory(model) -> str:
    if model.device.type != "cuda":
        return ""
    return f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def empty_cache(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def reset(decoder: Decoder) -> None:
    """No rows, no graphs: the next part starts from the bare layout."""
    decoder.abort()
    decoder.steps.clear()
    empty_cache(decoder.model)


@torch.inference_mode()
def whole_batches(decoder: Decoder, prompts: list[Prompt], rows_list: list[int]) -> None:
    for rows in rows_list:
        batch = prompts[:rows]
        decoder.generate(batch, lambda _r, _c: None)  # captures this layout's graphs (a warm-up on the CPU)
        started = synced()
        stats = decoder.generate(batch, lambda _r, _c: None)
        total = synced() - started
        print(f"  batch {rows:>3}: prefill {stats.prefill_s:.2f} s ({stats.prefill_s / rows * 1000:.1f} ms/row), "
              f"decode {stats.decode_s:.2f} s ({stats.decode_s / max(1, stats.steps) * 1000:.2f} ms/step, "
              f"{stats.steps} steps, graphed {stats.graphed}), {rows / total:.1f} rows/s, layout "
              f"{stats.cache_rows} x {stats.cache_length}{peak_memory(decoder.model)}", flush=True)
        reset(decoder)


@torch.inference_mode()
def mixed_lengths(decoder: Decoder, prompts: list[Prompt], rows: int, lengths: str, seed: int) -> None:
    """Continuous decoding of prompts of mixed max_new_tokens, at most `rows` at once."""
    low, high = (int(x) for x in lengths.split(":"))
    draw = random.Random(seed)
    batch = [Prompt(prompts[i % len(prompts)].inputs, round(math.exp(draw.uniform(math.log(low), math.log(high)))))
             for i in range(2 * rows)]
    # The warm-up captures the row-count buckets' graphs: the first `rows` prompts, a quarter of their tokens.
    decoder.generate([Prompt(p.inputs, max(2, p.max_new_tokens // 4)) for p in batch[:rows]], lambda _r, _c: None,
                     max_rows=rows)
    produced: list[int] = []
    started = synced()
    stats = decoder.generate(batch, lambda _r, c: produced.append(len(c.tokens)), max_rows=rows)
    total = synced() - started
    reset(decoder)
    print(f"  mixed {len(batch)} prompts, max_new_tokens {lengths} (mean {sum(produced) / len(produced):.0f}), at "
          f"most {rows} rows: {sum(produced) / total:.0f} output tok/s, {len(batch) / total:.1f} rows/s, "
          f"{stats.steps} steps ({stats.decode_s / max(1, stats.steps) * 1000:.2f} ms/step), prefill "
          f"{stats.prefill_s:.2f} s, peak rows {stats.peak_rows}, layout {stats.cache_rows} x "
          f"{stats.cache_length}{peak_memory(decoder.model)}", flush=True)


def vision_tower(model, inputs: dict[str, torch.Tensor]):
    """The image encoder alone (Phi-3-V's embedding with its crops, or LLaVA's tower and projector), or None."""
    embed = getattr(model.model, "vision_embed_tokens", None)
    if embed is not None:
        return lambda: embed(inputs["pixel_values"], inputs["image_sizes"])
    if hasattr(model, "get_image_features"):
        return lambda: model.get_image_features(pixel_values=inputs["pixel_values"])
    return None


@torch.inference_mode()
def prefill_parts(model, decoder: Decoder, prompts: list[Prompt], out: Path, chunk_sizes: list[int]) -> None:
    cuda = model.device.type == "cuda"
    length = max(p.length for p in prompts)
    rows = max(1, min(len(prompts), decoder.prefill_tokens // length))
    started = time.perf_counter()
    inputs = collate([p.inputs for p in prompts[:rows]], length, decoder.pad_id)
    collate_s = time.perf_counter() - started
    started = time.perf_counter()
    inputs = on_device(model, inputs)
    h2d_s = synced() - started

    def forward():
        mask = inputs["attention_mask"]
        model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)

    parts = {"forward": forward}
    vision = vision_tower(model, inputs)
    if vision is not None:
        parts["vision"] = vision
    timings = {}
    for name, fn in parts.items():
        fn()
        started = synced()
        for _ in range(3):
            fn()
        timings[name] = (synced() - started) / 3
    vision_text = (f"vision tower {timings['vision'] * 1000:.1f} ms ({timings['vision'] / rows * 1000:.2f} ms/row)"
                   if "vision" in timings else "no vision tower found")
    print(f"  one prefill chunk: {rows} rows x {length} tokens; collate {collate_s * 1000:.1f} ms, "
          f"copy to {model.device.type} {h2d_s * 1000:.1f} ms; {vision_text}; whole forward "
          f"{timings['forward'] * 1000:.1f} ms ({timings['forward'] / rows * 1000:.2f} ms/row)", flush=True)
    for name, fn in parts.items():
        print(f"    {name} kernels: {fmt(profile(fn, out, f'{name}-{length}', cuda))}", flush=True)
    admit_chunks(decoder, prompts, chunk_sizes)


def admit_chunks(decoder: Decoder, prompts: list[Prompt], chunk_sizes: list[int]) -> None:
    """The decoder's own prefill (`admit`: collate, copy, forward into the arena's rows) at each chunk size."""
    decoder.plan(max(p.need for p in prompts), len(prompts))
    batch = [(i, p) for i, p in enumerate(prompts[:len(decoder.rows)])]
    saved = decoder.prefill_tokens
    try:
        for chunk in chunk_sizes:
            decoder.prefill_tokens = chunk
            for _trial in ("warm-up", "timed"):
                started = synced()
                decoder.admit(batch)
                seconds = synced() - started
                reset(decoder)
            chunks = len(decoder._chunks(batch))
            print(f"    admit of {len(batch)} rows in chunks of {chunk} tokens ({chunks} chunks): "
                  f"{seconds / len(batch) * 1000:.2f} ms/row", flush=True)
    finally:
        decoder.prefill_tokens = saved


class RowState:
    """A copy of a layout's decode state, to put back so that every trial decodes from the same positions."""

    def __init__(self, layout):
        self.layout = layout
        self.saved = [t.clone() for t in self.tensors()]

    def tensors(self):
        layout = self.layout
        if hasattr(layout, "lengths"):  # a block layout
            return layout.tokens, layout.positions, layout.lengths
        return layout.tokens, layout.positions, layout.write, layout.mask

    def restore(self) -> None:
        for tensor, value in zip(self.tensors(), self.saved, strict=True):
            tensor.copy_(value)


@torch.inference_mode()
def decode_backends(model, decoder: Decoder, prompts: list[Prompt], out: Path) -> DecodeStep | None:
    """The decode step of len(prompts) admitted rows under each SDPA backend; returns the default one (graphed on
    CUDA when it captured) for the overlap, with the rows still admitted."""
    cuda = model.device.type == "cuda"
    decoder.plan(max(p.need for p in prompts), len(prompts))
    rows = min(len(prompts), len(decoder.rows))
    decoder.admit([(i, p) for i, p in enumerate(prompts[:rows])])
    layout, state = decoder.layout, RowState(decoder.layout)
    graphed = decoder.use_graphs and decoder.graphable(layout.length)  # as Decoder._step decides
    results, default = {}, None
    kind = BlockDecodeStep if decoder.blocks else DecodeStep
    with decoder.rope:
        for name, backends in BACKENDS[:1] if decoder.blocks else BACKENDS:
            trial = kind(model, layout, rows)
            try:
                with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                    if graphed:
                        trial.capture()
                    trial.run()
                    started = synced()
                    for _ in range(32):
                        trial.run()
                    results[name] = f"{(synced() - started) / 32 * 1000:.2f} ms"
            except RuntimeError as exc:
                results[name] = f"failed ({str(exc).split('. ')[0][:80]})"
            state.restore()
            if name == "default" and name in results and not results[name].startswith("failed"):
                default = trial
        print(f"  {'graphed' if graphed else 'eager'} decode step, {rows} rows, cache {layout.length}"
          f"{' (blocks)' if decoder.blocks else ''}: "
              + ", ".join(f"{k} {v}" for k, v in results.items()), flush=True)
        eager = kind(model, layout, rows)
        groups = profile(eager.step, out, f"decode-{rows}-{layout.length}", cuda)
        state.restore()
    print(f"    eager step kernels: {fmt(groups)}", flush=True)
    return default


@torch.inference_mode()
def overlap(model, decoder: Decoder, step: DecodeStep, prompts: list[Prompt], prefill_rows: int,
            new_tokens: int) -> None:
    """Decode graph replays on a high-priority stream while another thread prefills on a low-priority one."""
    if model.device.type != "cuda":
        print("  overlap: skipped (needs CUDA streams; on the CPU there is nothing to overlap)", flush=True)
        return
    length = max(p.length for p in prompts)
    high = torch.cuda.Stream(priority=-1)
    low = torch.cuda.Stream(priority=0)
    batch = prompts[:prefill_rows]
    per_chunk = max(1, decoder.prefill_tokens // length)
    state = RowState(decoder.layout)

    def decode():
        with torch.inference_mode(), torch.cuda.stream(high):
            for _ in range(new_tokens):
                step.run()
            high.synchronize()

    def prefill():
        with torch.inference_mode(), torch.cuda.stream(low):
            for start in range(0, len(batch), per_chunk):
                inputs = on_device(model, collate([p.inputs for p in batch[start:start + per_chunk]], length,
                                                  decoder.pad_id))
                mask = inputs["attention_mask"]
                model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)
            low.synchronize()

    timings = {}
    # The rope swap is entered once here: the two threads share the model, and entering it per thread would race.
    with decoder.rope:
        for name, fns in (("decode", [decode]), ("prefill", [prefill]), ("both", [decode, prefill])):
            for _attempt in range(2):
                state.restore()
                torch.cuda.synchronize()
                started = time.perf_counter()
                threads = [threading.Thread(target=fn) for fn in fns]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                timings[name] = time.perf_counter() - started
    print(f"  overlap: decode {step.rows} rows x {new_tokens} steps alone {timings['decode']:.2f} s "
          f"(graphed {step.graph is not None}); prefill {prefill_rows} rows alone {timings['prefill']:.2f} s; sum "
          f"{timings['decode'] + timings['prefill']:.2f} s; both at once {timings['both']:.2f} s", flush=True)


def attempt(fn, *args):
    """One part failing (out of memory, say) must not cost the parts after it."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 (a probe reports and goes on)
        print(f"  {fn.__name__} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-crops", default="4,16", help="Phi-3-V's crops per image (the default model only)")
    parser.add_argument("--config", default=str(CONFIG), help="the real-shape model's config (random weights)")
    parser.add_argument("--model", default="", help="a saved checkpoint to load instead (e.g. a tiny model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--rows", default="", help="batch sizes, e.g. 2,4 (default: 64,128 at 4 crops, else "
                                                   "16,32,48); the decode part uses the one before the largest")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk-tokens", default="8192,32768", help="the prefill part's admit chunk sizes")
    parser.add_argument("--kv-gib", type=float, default=0.0,
                        help="KV budget (default: 3/4 of free GPU memory; 1 GiB on the CPU)")
    parser.add_argument("--out", default="/tmp/gpu-profile")
    parser.add_argument("--parts", default="batches,prefill,decode,overlap", help="also: mixed")
    parser.add_argument("--kv-blocks", default="off", help="KV caches to run, in order: off (rows), on (blocks)")
    parser.add_argument("--lengths", default="16:512", help="the mixed part's max_new_tokens range (log-uniform)")
    parser.add_argument("--mixed-rows", type=int, default=0, help="the mixed part's rows at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused", default="both", choices=["off", "on", "both"],
                        help="the Triton elementwise kernels (worker/kernels.py): without, with, or without then with "
                             "(CUDA only: on the CPU, off)")
    args = parser.parse_args()
    out = Path(args.out)
    for label in ("eager", "fused"):
        (out / label).mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}", flush=True)
    started = synced()
    if args.model:
        model, processor = load(args.model, args.device, torch.bfloat16 if cuda else torch.float32)
    else:
        model, processor = build(Path(args.config), args.device), None
    print(f"built in {synced() - started:.1f} s", flush=True)
    kv_budget = int(args.kv_gib * 2**30) or (int(torch.cuda.mem_get_info()[0] * 0.75) if cuda else 2**30)
    fused_runs = {"off": [False], "on": [True], "both": [False, True]}[args.fused] if cuda else [False]
    for fused in fused_runs:
        if fused:
            print(f"fused kernels: {', '.join(kernels.fuse(model)) or 'none apply'}", flush=True)
        for crops in ints(args.num_crops) if processor is None else [None]:
            for blocks in args.kv_blocks.split(","):
                probe(model, processor or phi3v_processor(crops), crops, args,
                      out / ("fused" if fused else "eager"), kv_budget, blocks == "on")


def phi3v_processor(crops: int):
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=crops), build_phi3v_tokenizer())


def probe(model, processor, crops: int | None, args, out: Path, kv_budget: int, blocks: bool = False) -> None:
    parts = args.parts.split(",")
    rows_list = ints(args.rows) or ([64, 128] if (crops or 0) <= 4 else [16, 32, 48])
    if args.rows:
        decode_rows = rows_list[-2] if len(rows_list) > 1 else rows_list[0]
    else:
        decode_rows = rows_list[-2] if (crops or 0) <= 4 else 24
    prompts = make_prompts(model, processor, max(rows_list), args.new_tokens)
    label = "fused" if out.name == "fused" else "eager"
    print(f"num_crops={crops if crops is not None else 'as saved'} ({label} elementwise kernels, KV cache by "
          f"{'blocks' if blocks else 'rows'}): prompt {prompts[0].length} tokens, {args.new_tokens} new tokens",
          flush=True)
    decoder = Decoder(model, [], 0, use_graphs=True, kv_budget_bytes=kv_budget, kv_blocks=blocks)
    if "batches" in parts:
        attempt(whole_batches, decoder, prompts, rows_list)
    if "mixed" in parts:
        attempt(mixed_lengths, decoder, prompts, args.mixed_rows or max(rows_list), args.lengths, args.seed)
    if "prefill" in parts:
        attempt(prefill_parts, model, decoder, prompts, out, ints(args.chunk_tokens))
        reset(decoder)
    if "decode" in parts or "overlap" in parts:
        step = attempt(decode_backends, model, decoder, prompts[:decode_rows], out)
        if "overlap" in parts and step is None:
            print("  overlap: skipped (the decode part's default step did not run)", flush=True)
        elif "overlap" in parts:
            attempt(overlap, model, decoder, step, prompts, decode_rows, args.new_tokens)
        del step
        reset(decoder)
    decoder.layout = None
    decoder.arena = None
    empty_cache(model)


if __name__ == "__main__":
    main()
