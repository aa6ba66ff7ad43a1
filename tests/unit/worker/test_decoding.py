"""The batched decoder against transformers' own greedy `generate`, one prompt at a time, on both tiny models.

On the CPU (fp32) every row of a batch must equal its unbatched `generate` token for token: left padding, the
static cache, the 4-D mask and per-row positions change nothing; nor does the KV cache by blocks (`cache` "blocks":
worker/blocks.py, block attention by the torch reference on the CPU, by the Triton kernel in its interpreter in
one test), whose rows join, end, give their blocks to new rows, get canceled and wait for blocks.
The CUDA tests (they skip without a GPU) check
the captured graphs: fp32 graphed batches equal unbatched `generate` on every token; in bf16 a graph replay equals
the same batch run eagerly on every token, while batched and unbatched bf16 runs are only compared on the first
token (differently shaped bf16 matmuls round differently, which flips near-ties of random weights' flat logits).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import worker.models.phi3v  # noqa: F401  (Auto registration)
from tests.images import random_image
from worker.blocks import BLOCK_SIZE, blocks_for
from worker.decoding import Decoder, KVShape, Prompt, collate, length_bucket, row_bucket
from worker.prompts import phi3_prompt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs and bf16 kernels")
QUESTIONS = ["Describe this image in detail.", "What is the difference between these images?",
             "Extract all the text in this image, in reading order, with every line and every number on it."]


@pytest.fixture(scope="module", params=["llava", "phi3v"])
def tiny(request, tmp_path_factory):
    from cli.tiny_model import build_tiny_model, build_tiny_phi3v

    build = build_tiny_model if request.param == "llava" else build_tiny_phi3v
    path = build(tmp_path_factory.mktemp(request.param) / "model")
    return request.param, path, AutoProcessor.from_pretrained(path)


def prompt_text(arch: str, n_images: int, question: str) -> str:
    if arch == "phi3v":
        return phi3_prompt(n_images, question)
    return "<|user|>\n" + "<image>\n" * n_images + question + "<|end|>\n<|assistant|>\n"


def jobs(arch: str, count: int = 5) -> list[tuple[str, list[Image.Image], int]]:
    """Prompts of different lengths, one or two images each, and different max_new_tokens."""
    out = []
    for i in range(count):
        n_images = 2 if i % 3 == 1 else 1
        images = [random_image(40 + 8 * i + k, 48, seed=10 * i + k) for k in range(n_images)]
        out.append((prompt_text(arch, n_images, QUESTIONS[i % 3]), images, 6 + 4 * i))
    return out


@pytest.fixture(params=["rows", "blocks"])
def cache(request) -> str:
    """The decoder's KV cache: rows of one length, or blocks."""
    return request.param


def load(path, device: str, dtype: torch.dtype, attention: str = "sdpa"):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(
        device).eval()


def long_job(arch: str) -> tuple[str, list[Image.Image], int]:
    """A prompt past 4,096 positions (Phi-3-V's long-RoPE threshold: its long factors apply from there)."""
    return prompt_text(arch, 1, "lorem ipsum dolor sit amet " * 240 + QUESTIONS[0]), [random_image(48, 40, 7)], 6


def unbatched(model, processor, job) -> list[int]:
    text, images, max_new = job
    inputs = processor(text=text, images=images, return_tensors="pt").to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def decoder_for(model, processor, use_graphs: bool, cache: str = "rows", kv_budget_bytes: int = 1 << 30,
                **options) -> Decoder:
    eos = model.generation_config.eos_token_id
    return Decoder(model, [eos], processor.tokenizer.pad_token_id, use_graphs=use_graphs,
                   kv_budget_bytes=kv_budget_bytes, kv_blocks=cache == "blocks", **options)


def prompts_of(processor, batch) -> list[Prompt]:
    return [Prompt(dict(processor(text=t, images=im, return_tensors="pt")), m) for t, im, m in batch]


def batched(decoder: Decoder, processor, batch, canceled=lambda: set()) -> dict[int, list[int]]:
    prompts = prompts_of(processor, batch)
    done: dict[int, list[int]] = {}
    decoder.generate(prompts, lambda row, completion: done.__setitem__(row, completion.tokens), canceled)
    return done


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_row_of_a_batch_equals_its_unbatched_generate(tiny, attention, cache):
    arch, path, processor = tiny
    torch.manual_seed(0)
    model = load(path, "cpu", torch.float32, attention)
    batch = jobs(arch)
    got = batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch)
    assert sorted(got) == list(range(len(batch)))
    for row, job in enumerate(batch):
        assert got[row] == unbatched(model, processor, job), f"row {row}"
        assert len(got[row]) <= job[2]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_row_past_the_long_rope_threshold_leaves_its_short_neighbours_unchanged(tiny, attention, cache):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32, attention)
    batch = [jobs(arch, 3)[0], long_job(arch), *jobs(arch, 3)[1:]]
    prompts = [Prompt(dict(processor(text=t, images=im, return_tensors="pt")), m) for t, im, m in batch]
    assert prompts[1].length > 4096 > max(p.length for p in prompts if p is not prompts[1])
    got = batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch)
    for row, job in enumerate(batch):
        assert got[row] == unbatched(model, processor, job), f"row {row} ({attention})"


def test_a_reused_slot_gives_the_same_tokens_as_a_fresh_one(tiny, cache):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    decoder = decoder_for(model, processor, use_graphs=False, cache=cache)
    batch = jobs(arch, 3)
    first = batched(decoder, processor, batch)
    layout = decoder.layout
    assert batched(decoder, processor, batch) == first  # the rows' state was reset, not carried over
    assert decoder.layout is layout and decoder.running == 0


def test_a_canceled_row_ends_early_and_the_others_go_on(tiny, cache):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = [(text, images, 40) for text, images, _ in jobs(arch, 3)]
    calls = []

    def cancel_row_one() -> set[int]:
        calls.append(1)
        return {1} if len(calls) >= 2 else set()

    got = batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch, cancel_row_one)
    assert len(got[1]) < 40
    for row in (0, 2):
        assert got[row] == unbatched(model, processor, batch[row])


@pytest.mark.parametrize("lone_prefill", [False, True])
def test_an_fp8_cache_keeps_each_row_independent_of_its_batch(tiny, lone_prefill):
    """VISIONQ_KV_CACHE_DTYPE=fp8 changes a job's output (the model's own is not reproduced: none is asserted),
    but never makes it depend on its neighbours: each row batched equals its prompt alone through the same fp8
    cache, and the first token (from the prefill's own keys and values) is the model's."""
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = jobs(arch)

    def fp8_decoder() -> Decoder:
        return decoder_for(model, processor, use_graphs=False, cache="blocks", kv_dtype=torch.float8_e4m3fn,
                           lone_prefill=lone_prefill)

    decoder = fp8_decoder()
    got = batched(decoder, processor, batch)
    assert decoder.arena.dtype == torch.float8_e4m3fn
    for row, job in enumerate(batch):
        assert got[row] == batched(fp8_decoder(), processor, [job])[0], f"row {row}"
        assert got[row][0] == unbatched(model, processor, job)[0], f"row {row}"
    bf16_bytes = KVShape.of(model, torch.bfloat16).bytes_per_token
    assert decoder.kv_shape.bytes_per_token * 2 == bf16_bytes  # twice the tokens in the same budget


def test_an_fp8_cache_needs_blocks(tiny):
    arch, path, processor = tiny
    with pytest.raises(ValueError, match="by blocks"):
        decoder_for(load(path, "cpu", torch.float32), processor, use_graphs=False, kv_dtype=torch.float8_e4m3fn)


def test_a_capture_that_fails_after_its_warm_up_leaves_the_rows_where_they_were(tiny, cache, monkeypatch):
    """A CUDA capture can fail after its warm-up steps ran (out of memory, say): the step then runs eagerly, and must
    start from the rows' state before the warm-up, or each row loses the warm-up's tokens. The capture is stood in
    for on the CPU by its warm-up and an error."""
    from worker import graphs

    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = jobs(arch, 3)
    plain = batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch)

    def failing_capture(step, _model):
        for _ in range(graphs.WARM_UP):
            step()
        raise RuntimeError("capture failed")

    monkeypatch.setattr(graphs, "capture", failing_capture)
    decoder = decoder_for(model, processor, use_graphs=False, cache=cache)
    decoder.use_graphs = True  # the CUDA branch of the decode step, whose capture fails
    assert batched(decoder, processor, batch) == plain
    assert decoder.steps and all(step.graph is None for step in decoder.steps.values())


def test_collate_left_pads_tokens_and_stacks_images():
    one = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "pixel_values": torch.ones(1, 2, 3)}
    two = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
           "pixel_values": torch.ones(2, 3, 3)}
    batch = collate([one, two], 3, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (3, 3, 3)
    assert batch["pixel_values"][0, 2].abs().sum() == 0  # the shorter image tensor is zero-padded


def test_buckets_round_up():
    assert [row_bucket(n) for n in (1, 3, 17, 100)] == [1, 4, 24, 128]
    assert [length_bucket(n) for n in (1, 64, 65)] == [64, 64, 128]


@CUDA
def test_cuda_graphed_batches_equal_unbatched_generate_in_fp32(tiny, cache):
    arch, path, processor = tiny
    model = load(path, "cuda", torch.float32)
    decoder = decoder_for(model, processor, use_graphs=True, cache=cache)
    batch = jobs(arch)
    got = batched(decoder, processor, batch)
    assert decoder.steps and all(step.graph is not None for step in decoder.steps.values())
    for row, job in enumerate(batch):
        assert got[row] == unbatched(model, processor, job), f"row {row}"


@CUDA
def test_cuda_with_blocks_a_later_run_keeps_the_layout_and_its_graphs(tiny):
    """On CUDA the pool is the whole KV budget and a row may grow as long as it holds: a run whose first prompts
    need more than the last run's keeps the layout, and the decode steps captured for it (a new layout would
    capture every row bucket again)."""
    arch, path, processor = tiny
    model = load(path, "cuda", torch.float32)
    decoder = decoder_for(model, processor, use_graphs=True, cache="blocks")
    short, longer = prompts_of(processor, [(text, images, new) for (text, images, _), new
                                           in zip(jobs(arch, 2), [4, 300], strict=True)])
    decoder.plan(short.need, 4)
    layout = decoder.layout
    decoder.admit([(0, short)])
    while decoder.running:
        decoder.step()
    steps = dict(decoder.steps)
    assert steps and length_bucket(longer.need) > length_bucket(short.need)
    decoder.plan(longer.need, 4)
    assert decoder.layout is layout and decoder.steps == steps and decoder.fits(longer)


@CUDA
def test_cuda_graph_replay_equals_eager_steps_in_bf16(tiny, cache):
    arch, path, processor = tiny
    model = load(path, "cuda", torch.bfloat16)
    batch = jobs(arch)
    graphed_decoder = decoder_for(model, processor, use_graphs=True, cache=cache)
    graphed = batched(graphed_decoder, processor, batch)
    assert graphed_decoder.steps and all(step.graph is not None for step in graphed_decoder.steps.values())
    assert graphed == batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch)
    firsts = [unbatched(model, processor, job)[0] for job in batch]
    assert [graphed[row][0] for row in range(len(batch))] == firsts


@CUDA
@pytest.mark.parametrize("lone_prefill", [False, True])
def test_cuda_an_fp8_cache_graphs_like_eager_and_keeps_the_first_tokens_in_bf16(tiny, lone_prefill):
    """VISIONQ_KV_CACHE_DTYPE=fp8 on CUDA: the compiled write and decode kernels over fp8 pools, inside captured
    decode steps (and lone prefills), give what the same cache gives eagerly; the prefill's first tokens are the
    model's."""
    arch, path, processor = tiny
    model = load(path, "cuda", torch.bfloat16)
    batch = jobs(arch)

    def fp8_decoder(use_graphs: bool) -> Decoder:
        return decoder_for(model, processor, use_graphs=use_graphs, cache="blocks", kv_dtype=torch.float8_e4m3fn,
                           lone_prefill=lone_prefill)

    graphed_decoder = fp8_decoder(use_graphs=True)
    graphed = batched(graphed_decoder, processor, batch)
    assert graphed_decoder.arena.dtype == torch.float8_e4m3fn
    assert graphed_decoder.steps and all(step.graph is not None for step in graphed_decoder.steps.values())
    assert graphed == batched(fp8_decoder(use_graphs=False), processor, batch)
    firsts = [unbatched(model, processor, job)[0] for job in batch]
    assert [graphed[row][0] for row in range(len(batch))] == firsts


@CUDA
def test_cuda_fused_kernels_keep_the_first_tokens_and_graph_like_eager_in_bf16(tiny):
    from worker import kernels

    arch, path, processor = tiny
    model = load(path, "cuda", torch.bfloat16)
    # The whole batch, and one job alone: its steps of one row take the few-rows matrix kernel (worker/gemv.py).
    batches = [jobs(arch), jobs(arch)[:1]]
    plain = [batched(decoder_for(model, processor, use_graphs=True), processor, batch) for batch in batches]
    assert "Linear" in kernels.fuse(model)
    for batch, unfused in zip(batches, plain, strict=True):
        graphed_decoder = decoder_for(model, processor, use_graphs=True)
        fused = batched(graphed_decoder, processor, batch)
        assert graphed_decoder.steps and all(step.graph is not None for step in graphed_decoder.steps.values())
        assert fused == batched(decoder_for(model, processor, use_graphs=False), processor, batch)
        assert [fused[row][0] for row in range(len(batch))] == [unfused[row][0] for row in range(len(batch))]
        same = [next((i for i, (a, b) in enumerate(zip(fused[r], unfused[r], strict=False)) if a != b),
                     len(unfused[r])) for r in range(len(batch))]
        print(f"{arch}: leading tokens equal, fused vs unfused kernels, per row: {same} of "
              f"{[len(unfused[r]) for r in range(len(batch))]}")


def test_prompts_prefilled_alone_equal_their_unbatched_generate(tiny):
    """A prompt alone prefills through worker/lone_prefill.py (padded on the left to its length bucket, a 4-D mask,
    a slot per position): here eagerly, the step a CUDA graph captures on the GPU; chunks of one prompt each. LLaVA
    does not embed its images in one function: it prefills as chunks do."""
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    decoder = decoder_for(model, processor, use_graphs=False, cache="blocks", prefill_tokens=1, lone_prefill=True)
    if arch != "phi3v":
        assert not decoder.lone_prefill
        return
    batch = jobs(arch)
    prompts = prompts_of(processor, batch)
    assert any(length_bucket(p.length) != p.length for p in prompts)  # padding the lone prefill must mask
    assert len({p.length for p in prompts}) > 1  # one LonePrefill of a bucket serves prompts of several lengths
    got = batched(decoder, processor, batch)
    assert decoder.lones and all(lone.graph is None for lone in decoder.lones.values())
    for row, job in enumerate(batch):
        assert got[row] == unbatched(model, processor, job), f"row {row}"


@CUDA
def test_cuda_a_lone_prompts_graphed_prefill_equals_its_eager_one_in_bf16(tiny):
    arch, path, processor = tiny
    if arch != "phi3v":
        pytest.skip("LLaVA prefills one prompt as chunks do")
    model = load(path, "cuda", torch.bfloat16)
    batch = jobs(arch)[:3]
    graphed_decoder = decoder_for(model, processor, use_graphs=True, cache="blocks", prefill_tokens=1)
    graphed = batched(graphed_decoder, processor, batch)
    assert graphed_decoder.lones and all(lone.graph is not None for lone in graphed_decoder.lones.values())
    eager = batched(decoder_for(model, processor, use_graphs=False, cache="blocks", prefill_tokens=1,
                                lone_prefill=True), processor, batch)
    assert graphed == eager


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rows_that_join_mid_decode_equal_their_unbatched_generate(tiny, attention, cache):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32, attention)
    lengths = [30, 6, 18, 3, 26, 8, 14]  # rows end out of order; the last four join rows that freed mid-decode
    batch = [(text, images, new) for (text, images, _), new in zip(jobs(arch, 7), lengths, strict=True)]
    prompts = [Prompt(dict(processor(text=t, images=im, return_tensors="pt")), m) for t, im, m in batch]
    decoder = decoder_for(model, processor, use_graphs=False, cache=cache)
    order: list[int] = []
    done: dict[int, list[int]] = {}

    def finish(row: int, completion) -> None:
        order.append(row)
        done[row] = completion.tokens

    stats = decoder.generate(prompts, finish, max_rows=3)  # 3 rows: the other 4 prompts join as rows free up
    assert stats.peak_rows == 3 and len(decoder.rows) == 3
    assert order.index(3) < order.index(0)  # joined a row freed mid-decode, ended before the first row
    for row, job in enumerate(batch):
        assert done[row] == unbatched(model, processor, job), f"row {row}"


def crossing_job(processor) -> tuple[str, list[Image.Image], int]:
    """A prompt just under long-RoPE's threshold whose output crosses it (Phi-3 `generate` recomputes there). The
    tiny model's tokens happen not to change at the crossing whether the row is recomputed or not: this checks
    that the recompute runs and agrees, not that it is needed."""
    images = [random_image(48, 40, 7)]
    for extra in range(40):
        text = prompt_text("phi3v", 1, "lorem ipsum dolor sit amet " * 184 + "x" * extra)
        length = processor(text=text, images=images, return_tensors="pt")["input_ids"].shape[1]
        if 4090 <= length <= 4094:
            return text, images, 12
    raise AssertionError("no prompt length found just under 4,096")


def test_a_row_that_crosses_the_long_rope_threshold_recomputes_like_generate(tiny, cache):
    arch, path, processor = tiny
    if arch != "phi3v":
        pytest.skip("only Phi-3-V has long-RoPE")
    model = load(path, "cpu", torch.float32)
    batch = [jobs(arch, 2)[0], crossing_job(processor), jobs(arch, 2)[1]]
    got = batched(decoder_for(model, processor, use_graphs=False, cache=cache), processor, batch)
    for row, job in enumerate(batch):
        assert got[row] == unbatched(model, processor, job), f"row {row}"


def cached_keys(decoder: Decoder, row: int, tokens: int) -> torch.Tensor:
    """Layer 0's cached keys of a row's first `tokens` tokens, [heads, tokens, head_dim], whichever the cache."""
    if decoder.blocks:
        return decoder.layout.cached(row, 0)[0][:, :tokens].clone()
    return decoder.layout.keys[0][row, :, :tokens].clone()  # a row prefilled alone has no left padding


def test_the_long_rope_crossing_rewrites_the_rows_cache_with_the_long_factors(tiny, cache):
    """The recompute is real and it matters: once the row crosses 4,096 positions its cached prompt keys are no
    longer the short-factor keys of its prefill (a stale cache would keep those) but equal the keys of one fresh
    forward of the prompt and its tokens so far, which transformers runs with the long factors."""
    arch, path, processor = tiny
    if arch != "phi3v":
        pytest.skip("only Phi-3-V has long-RoPE")
    model = load(path, "cpu", torch.float32)
    decoder = decoder_for(model, processor, use_graphs=False, cache=cache)
    prompt = prompts_of(processor, [crossing_job(processor)])[0]
    decoder.plan(prompt.need, 1)
    assert decoder.admit([(0, prompt)]) == []
    short_keys = cached_keys(decoder, 0, prompt.length)
    while decoder.rows[0].short:
        assert decoder.step() == []
    row = decoder.rows[0]
    assert row.carried and prompt.length + len(row.carried) > 4096  # crossed, and still running
    long_keys = cached_keys(decoder, 0, prompt.length)
    inputs = dict(prompt.inputs)
    produced = torch.tensor([row.carried])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], produced], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        fresh = model(**inputs, use_cache=True).past_key_values
    expected = fresh.layers[0].keys[0, :, :prompt.length]
    assert (long_keys - expected).abs().max() <= 1e-4
    assert (short_keys - expected).abs().max() > 0.1  # the short factors' keys are far from them


def test_blocks_of_rows_that_end_go_to_the_rows_that_join(tiny):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = [(text, images, new) for (text, images, _), new in zip(jobs(arch, 3), [4, 20, 12], strict=True)]
    prompts = prompts_of(processor, batch)
    decoder = decoder_for(model, processor, use_graphs=False, cache="blocks")
    decoder.plan(max(p.need for p in prompts), 2)
    layout = decoder.layout
    free_at_start = len(layout.free_blocks)
    done: dict[int, list[int]] = {}
    decoder.admit([(0, prompts[0]), (1, prompts[1])])
    first_blocks = set(layout.owned[0])
    assert len(first_blocks) == blocks_for(prompts[0].need) and not first_blocks & set(layout.owned[1])
    while 0 not in done:
        done.update((tag, c.tokens) for tag, c in decoder.step())
    assert len(layout.free_blocks) == free_at_start - blocks_for(prompts[1].need)  # row 0's blocks back at once
    decoder.admit([(2, prompts[2])])
    assert set(layout.owned[decoder.rows.index(next(r for r in decoder.rows if r and r.tag == 2))]) & first_blocks
    while decoder.running:
        done.update((tag, c.tokens) for tag, c in decoder.step())
    assert len(layout.free_blocks) == free_at_start
    for row, job in enumerate(batch):
        assert done[row] == unbatched(model, processor, job), f"row {row}"


def test_a_canceled_row_gives_its_blocks_back_at_once(tiny):
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = [(text, images, 30) for text, images, _ in jobs(arch, 2)]
    prompts = prompts_of(processor, batch)
    decoder = decoder_for(model, processor, use_graphs=False, cache="blocks")
    decoder.plan(max(p.need for p in prompts), 2)
    free_at_start = len(decoder.layout.free_blocks)
    decoder.admit([(0, prompts[0]), (1, prompts[1])])
    decoder.step()
    (tag, completion), = decoder.cancel({0})
    assert tag == 0 and completion.canceled and len(completion.tokens) == 2
    assert len(decoder.layout.free_blocks) == free_at_start - blocks_for(prompts[1].need)
    done = {}
    while decoder.running:
        done.update((tag, c.tokens) for tag, c in decoder.step())
    assert done[1] == unbatched(model, processor, batch[1])


def test_prompts_wait_for_free_blocks_when_the_pool_runs_short(tiny):
    """A pool of blocks for only the two largest needs, five free rows: the others wait for blocks, not rows, and
    every output is still exact."""
    arch, path, processor = tiny
    model = load(path, "cpu", torch.float32)
    batch = [(text, images, new) for (text, images, _), new in zip(jobs(arch, 5), [70, 130, 20, 100, 66], strict=True)]
    prompts = prompts_of(processor, batch)
    needs = sorted(blocks_for(p.need) for p in prompts)
    assert needs[0] >= 2  # so that five rows fit the pool's blocks, but not five rows' needs
    budget = sum(needs[-2:]) * BLOCK_SIZE * KVShape.of(model).bytes_per_token
    decoder = decoder_for(model, processor, use_graphs=False, cache="blocks", kv_budget_bytes=budget)
    done: dict[int, list[int]] = {}
    stats = decoder.generate(prompts, lambda row, completion: done.__setitem__(row, completion.tokens), max_rows=5)
    assert len(decoder.rows) == 5 and decoder.layout.blocks == sum(needs[-2:]) + 1  # the trash block
    assert stats.peak_rows < 5
    assert not decoder.fits(prompts[1], [prompts[0]] * (decoder.layout.blocks // blocks_for(prompts[0].need)))
    for row, job in enumerate(batch):
        assert done[row] == unbatched(model, processor, job), f"row {row}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_block_rows_equal_unbatched_generate_with_the_triton_kernel_in_its_interpreter(tmp_path):
    """The same decoder with block attention by the Triton kernel (worker/paged_attention.py), which runs on CUDA,
    here in Triton's interpreter: a subprocess, as TRITON_INTERPRET is read when Triton is imported."""
    code = ("import sys; from tests.unit.worker.test_decoding import interpreted_equality; "
            "sys.exit(interpreted_equality(sys.argv[1]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "kernel rows equal generate: 4" in out.stdout


def interpreted_equality(directory: str) -> int:
    from cli.tiny_model import build_tiny_model
    from worker import paged_attention

    assert paged_attention.INTERPRETED and paged_attention.triton is not None
    path = build_tiny_model(Path(directory) / "model")
    processor = AutoProcessor.from_pretrained(path)
    model = load(path, "cpu", torch.float32)
    batch = [(text, images, new) for (text, images, _), new in zip(jobs("llava", 4), [9, 3, 14, 6], strict=True)]
    got = batched(decoder_for(model, processor, use_graphs=False, cache="blocks"), processor, batch)
    same = sum(got[row] == unbatched(model, processor, job) for row, job in enumerate(batch))
    print(f"kernel rows equal generate: {same}")
    return 0 if same == len(batch) else 1
