"""The GPU thread's scheduling, on the tiny model: rows fill up to the cap, prompts join rows freed mid-decode,
and a bad job fails alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.images import random_image
from worker.batcher import Batcher
from worker.decoding import Decoder, Prompt

TEXT = "<|user|>\n<image>\nDescribe this image in detail.<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    processor = AutoProcessor.from_pretrained(tiny_model_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    return processor, model


def decoder(model, processor) -> Decoder:
    return Decoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                   use_graphs=False, kv_budget_bytes=1 << 30)


def prompt(processor, seed: int, max_new_tokens: int = 8) -> Prompt:
    inputs = processor(text=TEXT, images=[random_image(40, 40, seed)], return_tensors="pt")
    return Prompt(dict(inputs), max_new_tokens)


def alone(model, processor, one: Prompt) -> list[int]:
    done = []
    decoder(model, processor).generate([one], lambda _row, completion: done.append(completion.tokens))
    return done[0]


def test_a_burst_runs_in_rows_up_to_the_cap_and_the_rest_join_as_rows_free_up(tiny):
    processor, model = tiny
    runs = []
    batcher = Batcher(decoder(model, processor), max_batch=4, wait_s=0.5, on_batch=runs.append)
    prompts = [prompt(processor, seed, max_new_tokens=8 + 5 * seed) for seed in range(6)]
    futures = [batcher.submit(f"job{i}", p) for i, p in enumerate(prompts)]
    results = [future.result(timeout=60).tokens for future in futures]
    deadline = time.monotonic() + 10  # rows are handed back before their run is counted
    while sum(run.rows for run in runs) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(runs) == 1 and runs[0].rows == 6 and runs[0].peak_rows == 4 and runs[0].cache_rows == 4
    assert results == [alone(model, processor, p) for p in prompts]


def test_a_short_job_submitted_while_long_ones_decode_ends_first(tiny):
    processor, model = tiny
    endless = decoder(model, processor)
    endless.eos_ids = frozenset()  # the long rows run to their max_new_tokens: only the cancel below ends them
    canceled: set[str] = set()
    batcher = Batcher(endless, max_batch=4, wait_s=0.05, canceled=lambda ids: canceled & set(ids))
    long_ones = [batcher.submit(f"long{i}", prompt(processor, 50 + i, max_new_tokens=1500)) for i in range(2)]
    time.sleep(0.3)  # the long rows are decoding
    short = batcher.submit("short", prompt(processor, 60, max_new_tokens=4))
    assert len(short.result(timeout=60).tokens) == 4
    assert not any(f.done() for f in long_ones)  # it joined their run and left it before them
    canceled.update({"long0", "long1"})
    assert all(f.result(timeout=60).canceled for f in long_ones)


def test_the_batcher_is_idle_only_while_no_row_decodes_and_no_ticket_waits(tiny):
    processor, model = tiny
    endless = decoder(model, processor)
    endless.eos_ids = frozenset()  # the row runs to its max_new_tokens, or until it is canceled
    canceled: set[str] = set()
    batcher = Batcher(endless, max_batch=4, wait_s=0.05, canceled=lambda ids: canceled & set(ids))
    assert batcher.idle()
    future = batcher.submit("long", prompt(processor, 70, max_new_tokens=1500))
    deadline = time.monotonic() + 30
    while not endless.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endless.running and not batcher.idle()  # decoding
    canceled.add("long")
    assert future.result(timeout=60).canceled
    while not batcher.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.idle()


def test_a_lone_job_submitted_from_its_task_starts_without_waiting_for_a_burst(tiny):
    """Announced (submitted inside `expect`, as the worker's tasks do) with no other task preparing, the ticket
    does not wait `wait_s` (here 5 s) for others; a ticket submitted outside `expect` still does."""
    processor, model = tiny
    batcher = Batcher(decoder(model, processor), max_batch=4, wait_s=5.0, on_batch=lambda stats: None)
    started = time.monotonic()
    with batcher.expect():
        future = batcher.submit("lone", prompt(processor, 80, max_new_tokens=2))
    future.result(timeout=60)
    assert time.monotonic() - started < 2.5
    started = time.monotonic()
    batcher.submit("unannounced", prompt(processor, 81, max_new_tokens=2)).result(timeout=60)
    assert time.monotonic() - started >= 5.0


def test_a_ticket_waits_for_a_task_still_preparing_and_they_start_together(tiny):
    processor, model = tiny
    runs = []
    batcher = Batcher(decoder(model, processor), max_batch=4, wait_s=0.05, fill_wait_s=10.0, on_batch=runs.append)
    preparing, release = threading.Event(), threading.Event()

    def slow_task():
        with batcher.expect():
            preparing.set()
            release.wait(30)
            return batcher.submit("slow", prompt(processor, 82, max_new_tokens=2))

    pool = ThreadPoolExecutor(1)
    slow = pool.submit(slow_task)
    preparing.wait(30)
    with batcher.expect():
        fast = batcher.submit("fast", prompt(processor, 83, max_new_tokens=2))
    time.sleep(0.5)  # the GPU thread holds "fast" while the other task prepares
    assert not fast.done()
    release.set()
    fast.result(timeout=60), slow.result(timeout=60).result(timeout=60)
    deadline = time.monotonic() + 30
    while not runs and time.monotonic() < deadline:  # a run is reported after its last row has resolved
        time.sleep(0.01)
    assert len(runs) == 1 and runs[0].rows == 2  # one run, both rows
    pool.shutdown()


def test_a_job_that_breaks_its_batch_fails_alone(tiny):
    processor, model = tiny
    batcher = Batcher(decoder(model, processor), max_batch=8, wait_s=0.5)
    good = [prompt(processor, seed) for seed in range(3)]
    bad = prompt(processor, 99)
    bad.inputs["input_ids"] = bad.inputs["input_ids"].clone()
    bad.inputs["input_ids"][0, -1] = 10**6  # no such token: the embedding lookup raises
    futures = [batcher.submit("good0", good[0]), batcher.submit("bad", bad),
               batcher.submit("good1", good[1]), batcher.submit("good2", good[2])]
    with pytest.raises(IndexError):
        futures[1].result(timeout=60)
    assert [futures[i].result(timeout=60).tokens for i in (0, 2, 3)] == [alone(model, processor, p) for p in good]


def test_canceled_jobs_end_early_with_a_canceled_completion(tiny):
    processor, model = tiny
    batcher = Batcher(decoder(model, processor), max_batch=4, wait_s=0.2, canceled=lambda ids: {"cancel-me"} & set(ids))
    long_one = prompt(processor, 1, max_new_tokens=400)
    assert len(alone(model, processor, long_one)) == 400  # it meets no end-of-sequence token: only a cancel ends it
    future = batcher.submit("cancel-me", long_one)
    completion = future.result(timeout=60)
    assert completion.canceled and len(completion.tokens) < 400


def test_with_blocks_a_burst_waits_for_free_blocks_and_every_result_is_exact(tiny):
    """A block pool for two rows' needs and a cap of six: the GPU thread admits by free blocks (a prompt whose
    blocks are not free waits, with those behind it), never by rows alone."""
    from worker.blocks import BLOCK_SIZE, blocks_for
    from worker.decoding import KVShape

    processor, model = tiny
    prompts = [prompt(processor, seed, max_new_tokens=70 + 9 * seed) for seed in range(6)]
    pool = 2 * max(blocks_for(p.need) for p in prompts)
    runs = []
    blocks = Decoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                     use_graphs=False, kv_budget_bytes=pool * BLOCK_SIZE * KVShape.of(model).bytes_per_token,
                     kv_blocks=True)
    batcher = Batcher(blocks, max_batch=6, wait_s=0.5, on_batch=runs.append)
    futures = [batcher.submit(f"job{i}", p) for i, p in enumerate(prompts)]
    results = [future.result(timeout=120).tokens for future in futures]
    deadline = time.monotonic() + 10
    while sum(run.rows for run in runs) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs[0].cache_rows == 6 and max(run.peak_rows for run in runs) <= 3 and sum(r.rows for r in runs) == 6
    assert results == [alone(model, processor, p) for p in prompts]


def test_with_blocks_a_prompt_needing_more_than_the_first_joins_its_run(tiny):
    """The run's first prompt sets no row length with blocks: a later prompt that needs more tokens (a longer
    question here) joins while the first decodes, instead of waiting for every row to end and a new run."""
    processor, model = tiny
    endless = Decoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                      use_graphs=False, kv_budget_bytes=1 << 30, kv_blocks=True)
    endless.eos_ids = frozenset()  # rows run to their max_new_tokens, or until they are canceled
    canceled: set[str] = set()
    runs = []
    batcher = Batcher(endless, max_batch=4, wait_s=0.05, canceled=lambda ids: canceled & set(ids),
                      on_batch=runs.append)
    first = prompt(processor, 1, max_new_tokens=1500)
    question = "Describe this image in detail. " + "Mention every colour you see. " * 70
    inputs = processor(text=TEXT.replace("Describe this image in detail.", question),
                       images=[random_image(40, 40, 2)], return_tensors="pt")
    longer = Prompt(dict(inputs), 4)
    assert longer.need > first.need + 64  # past the first prompt's length bucket: the check is not vacuous
    expected = alone(model, processor, longer)  # before the GPU thread uses the model
    running = batcher.submit("first", first)
    while not endless.running:
        time.sleep(0.005)
    assert batcher.submit("longer", longer).result(timeout=60).tokens == expected
    assert not running.done()  # it joined the first's run
    canceled.add("first")
    assert running.result(timeout=60).canceled
    deadline = time.monotonic() + 10
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(runs) == 1 and runs[0].rows == 2


class RecordingDecoder(Decoder):
    """The real decoder, noting the order in which prompts are admitted."""

    admitted: list[str]

    def admit(self, tagged):
        self.admitted += [ticket.job_id for ticket, _prompt in tagged]
        return super().admit(tagged)


def admission_order(tiny, short_lane: bool, waiting: list[tuple[str, int]]) -> list[str]:
    """Two rows, both held by blockers while `waiting` (job id, max_new_tokens) queues up; the order in which
    the waiting jobs were admitted once the blockers ended."""
    processor, model = tiny
    recording = RecordingDecoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                                 use_graphs=False, kv_budget_bytes=1 << 30)
    recording.admitted = []
    recording.eos_ids = frozenset()  # every row makes exactly its max_new_tokens: the order is the policy's alone
    batcher = Batcher(recording, max_batch=2, wait_s=0.5, short_lane=short_lane)
    blockers = [batcher.submit(f"blocker{i}", prompt(processor, 70 + i, max_new_tokens=60)) for i in range(2)]
    while len(recording.admitted) < 2:
        time.sleep(0.005)
    # The blockers hold both rows for 60 steps; these all wait before either ends (submitting takes microseconds).
    futures = [batcher.submit(job_id, prompt(processor, i, max_new_tokens=tokens))
               for i, (job_id, tokens) in enumerate(waiting)]
    assert not any(f.done() for f in blockers)
    for future in futures:
        future.result(timeout=60)
    assert recording.admitted[:2] == ["blocker0", "blocker1"]
    return recording.admitted[2:]


def test_the_short_lane_and_the_oldest_lane_take_turns_at_the_free_rows(tiny):
    waiting = [("t40", 40), ("t30", 30), ("t20", 20), ("t10", 10), ("t5", 5), ("t8", 8)]
    # Shortest (t5), oldest (t40), shortest left (t8), oldest left (t30), ...
    assert admission_order(tiny, True, waiting) == ["t5", "t40", "t8", "t30", "t10", "t20"]
    assert admission_order(tiny, False, waiting) == [job_id for job_id, _ in waiting]  # first come, first served


def test_a_long_job_waits_for_at_most_two_admissions_per_older_job_plus_one(tiny):
    # However many short jobs arrive after it, the long one (the oldest waiting) takes the second free row.
    waiting = [("long", 400)] + [(f"s{i}", 4) for i in range(1, 9)]
    order = admission_order(tiny, True, waiting)
    assert order.index("long") <= 1 and sorted(order) == sorted(job_id for job_id, _ in waiting)
    two_long = [("old", 300), ("long", 400)] + [(f"s{i}", 4) for i in range(1, 7)]
    order = admission_order(tiny, True, two_long)
    assert order.index("old") <= 1 and order.index("long") <= 3  # one older job: at most 2 x 1 + 1 admissions


class SteppingDecoder(Decoder):
    """The real decoder, noting how many prompts each admission took and how many decode steps came before it."""

    calls: list[tuple[int, int]]
    steps_done: int

    def admit(self, tagged):
        self.calls.append((len(tagged), self.steps_done))
        return super().admit(tagged)

    def step(self):
        self.steps_done += 1
        return super().step()


def test_a_burst_joins_a_step_budget_of_prompt_tokens_at_a_time_and_decodes_in_between(tiny):
    """With a budget of one prompt's tokens, a burst of four joins one prompt per decode step: the first rows
    decode (and a short one ends) while the rest of the burst waits, instead of waiting for the whole burst's
    prefill; every result is still exactly its own generate."""
    processor, model = tiny
    prompts = [prompt(processor, seed, max_new_tokens=tokens) for seed, tokens in enumerate((3, 30, 30, 30))]
    stepping = SteppingDecoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                               use_graphs=False, kv_budget_bytes=1 << 30)
    stepping.calls, stepping.steps_done = [], 0
    stepping.eos_ids = frozenset()  # each row makes exactly its max_new_tokens
    batcher = Batcher(stepping, max_batch=4, wait_s=0.5, step_tokens=max(p.length for p in prompts))
    futures = [batcher.submit(f"job{i}", p) for i, p in enumerate(prompts)]
    results = [future.result(timeout=60).tokens for future in futures]
    assert [count for count, _steps in stepping.calls] == [1, 1, 1, 1]
    assert [steps for _count, steps in stepping.calls] == [0, 1, 2, 3]
    exact = Decoder(model, [], processor.tokenizer.pad_token_id, use_graphs=False, kv_budget_bytes=1 << 30)
    expected = []
    exact.generate(prompts, lambda i, completion: expected.append((i, completion.tokens)))
    assert results == [tokens for _i, tokens in sorted(expected)]
    assert len(results[0]) == 3


def test_a_store_that_cannot_say_which_jobs_are_canceled_ends_no_run(tiny):
    processor, model = tiny

    asked = []

    def unreachable(ids):
        asked.append(ids)
        raise ConnectionError("Redis is down")

    batcher = Batcher(decoder(model, processor), max_batch=4, wait_s=0.05, canceled=unreachable)
    long_one = prompt(processor, 1, max_new_tokens=1500)  # long enough for polls (CANCEL_POLL_S)
    assert batcher.submit("job", long_one).result(timeout=60).tokens == alone(model, processor, long_one)
    assert asked and asked[0] == ["job"]  # it was asked, and failed, while the job ran
