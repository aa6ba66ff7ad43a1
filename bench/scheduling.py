"""The GPU thread's scheduling (worker/batcher.py) against a decoder that only keeps time, so that a policy's effect
on uneven work can be read without a GPU.

    python -m bench.scheduling [--jobs 512] [--cap 256] [--lengths 16:512] [--variant NAME:KEY=VALUE,...]

The real `Batcher` decides which prompts join and when; `TimedDecoder` stands in for worker/decoding.Decoder: it
admits a prompt when the 64-token blocks of its whole need are free (as worker/blocks.py does), and sleeps what the
H200 took for the work (Phi-3-vision of the real shape, bf16, num_crops 4, ~770-token prompts; bench.gpu_profile
and bench.gpu_throughput): a prefill chunk 8 ms + 0.019 ms a prompt token (one prompt ~23 ms, five ~81 ms, as
measured: 24, 79), a decode step 2.9 ms + 0.01 ms a row + its rows' cached keys and values read at 3.5 TB/s
(393 KB a token; 256 rows of ~900 tokens ~29 ms). Prompts reach the GPU thread as the worker's task threads prepare
them: jobs created `--submit-s` apart in all, each prepared in one of `--prep-processes` for `--prep-ms` (the
pool of worker/encoder_pool.py), inside `Batcher.expect` as a task's are.

What it does not have: the API, Redis and Celery, the preprocessing's CPU competing with the GPU thread's, a
kernel's own variance (a sleep overshoots by ~0.1 ms). It ranks policies on the same work; the system's figures
come from bench.gpu_throughput on the device. Forced and mixed runs as there: `--jobs` of `--new-tokens` and
`--mixed-jobs` of max_new_tokens log-uniform in `--lengths`, each variant printing tokens/s, the mixed/forced
ratio, latency p50/p95 and the p50 of the jobs of at most 32 tokens.

Variants (`--variant NAME:KEY=VALUE,...`, repeatable; default one as the worker runs): `step_tokens`,
`short_lane` (0/1), `rows_grow` (0: a layout's rows as long as its first prompts' longest need, as before
the blocks' rows could grow), `mixed_steps` (1: a step's prefill in the decode step's forward, modelled as saving
the step's fixed 2.9 ms: its weights read once and its launches, while the rows' keys and values are read as
before), `kv_bytes` (a cached token's bytes: 196608 for fp8 keys and values, which also doubles the pool's
tokens), `fill_ms`, `prep_lanes` (0: the preprocessing processes go to waiting tasks in
arrival order, not in the lanes' order of worker/lending.py).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from bench.gpu_throughput import mixed_lengths, percentile
from worker.batcher import Batcher
from worker.blocks import BLOCK_SIZE, blocks_for
from worker.decoding import Completion, length_bucket
from worker.lending import Lender

BYTES_PER_TOKEN = 2 * 32 * 32 * 96 * 2  # Phi-3-mini's keys and values: 32 layers x 32 heads x 96, bf16
PROMPT_TOKENS = 770  # describe on one 336x336 image at num_crops 4


@dataclass
class Cost:
    """Seconds of H200 work, by the shape of a prefill chunk or a decode step."""

    chunk_s: float = 0.008
    token_s: float = 0.019e-3
    step_s: float = 2.9e-3
    row_s: float = 0.01e-3
    bandwidth: float = 3.5e12
    kv_bytes: int = BYTES_PER_TOKEN  # a cached token's keys and values (half with VISIONQ_KV_CACHE_DTYPE=fp8)

    def prefill(self, tokens: int) -> float:
        return self.chunk_s + self.token_s * tokens

    def step(self, rows: int, cached: int) -> float:
        return self.step_s + self.row_s * rows + cached * self.kv_bytes / self.bandwidth


@dataclass
class TimedPrompt:
    length: int
    max_new_tokens: int

    @property
    def need(self) -> int:
        return self.length + self.max_new_tokens


@dataclass
class TimedRow:
    tag: object
    prompt: TimedPrompt
    made: int = 1  # the prefill makes the first token

    def completion(self, canceled: bool = False) -> Completion:
        return Completion([0] * self.made, self.prompt.length, canceled)


@dataclass
class TimedDecoder:
    """What the Batcher asks of a Decoder, with rows, blocks and sleeps instead of tensors."""

    cost: Cost
    pool_blocks: int
    rows_grow: bool = True
    mixed_steps: bool = False  # a step's prefill runs in the decode step's forward: the step's fixed part is saved
    prefill_tokens: int = 16384
    use_graphs: bool = True
    rows: list = field(default_factory=list)
    layout: SimpleNamespace | None = None
    free_blocks: int = 0
    admitted: dict = field(default_factory=dict)  # job id -> when its prefill began
    merged: bool = False  # this step's prefill ran in the same forward (mixed_steps)

    def plan(self, need: int, max_rows: int) -> None:
        length = self.pool_blocks * BLOCK_SIZE if self.rows_grow else length_bucket(need)
        self.layout = SimpleNamespace(rows=max_rows, length=length)
        self.rows, self.free_blocks = [None] * max_rows, self.pool_blocks

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    def free_rows(self) -> int:
        return len(self.rows) - self.running

    def fits(self, prompt: TimedPrompt, joining=()) -> bool:
        taken = sum(blocks_for(p.need) for p in joining)
        return prompt.need <= self.layout.length and blocks_for(prompt.need) + taken <= self.free_blocks

    def admit(self, tagged) -> list:
        self.merged = self.mixed_steps and self.running > 0
        ended, chunk_tokens = [], 0
        for tag, prompt in tagged:
            if chunk_tokens and chunk_tokens + prompt.length > self.prefill_tokens:
                time.sleep(self.cost.prefill(chunk_tokens))
                chunk_tokens = 0
            chunk_tokens += prompt.length
            index = self.rows.index(None)
            self.rows[index] = TimedRow(tag, prompt)
            self.admitted[tag.job_id] = time.perf_counter()
            self.free_blocks -= blocks_for(prompt.need)
        time.sleep(self.cost.prefill(chunk_tokens))
        return ended + self._settle()

    def step(self) -> list:
        live = [row for row in self.rows if row is not None]
        seconds = self.cost.step(len(live), sum(row.prompt.length + row.made for row in live))
        time.sleep(seconds - self.cost.step_s if self.merged else seconds)
        self.merged = False
        for row in live:
            row.made += 1
        return self._settle()

    def _settle(self, canceled: set | None = None) -> list:
        ended = []
        for i, row in enumerate(self.rows):
            if row is not None and (row.made >= row.prompt.max_new_tokens or (canceled and row.tag in canceled)):
                ended.append((row.tag, row.completion(canceled=bool(canceled))))
                self.free_blocks += blocks_for(row.prompt.need)
                self.rows[i] = None
        return ended

    def cancel(self, tags: set) -> list:
        return self._settle(tags)

    def abort(self) -> list:
        tags = [row.tag for row in self.rows if row is not None]
        self.rows, self.free_blocks = [None] * len(self.rows), self.pool_blocks
        return tags

    def out_of_memory(self) -> None:
        pass


def run(lengths: list[int], args, settings: dict[str, str]) -> dict:
    """Every job of `lengths` (its max_new_tokens) through a fresh Batcher over a TimedDecoder; figures as
    bench.gpu_throughput prints them."""
    cost = Cost(kv_bytes=int(settings.get("kv_bytes", BYTES_PER_TOKEN)))
    decoder = TimedDecoder(cost, pool_blocks=args.pool_tokens * BYTES_PER_TOKEN // cost.kv_bytes // BLOCK_SIZE,
                           rows_grow=settings.get("rows_grow", "1") == "1",
                           mixed_steps=settings.get("mixed_steps", "0") == "1")
    fill_s = float(settings.get("fill_ms", 20)) / 1000
    batcher = Batcher(decoder, args.cap, wait_s=0.005, fill_wait_s=fill_s,
                      short_lane=settings.get("short_lane", "1") == "1",
                      step_tokens=int(settings.get("step_tokens", 4096)), on_batch=lambda stats: runs.append(stats))
    runs = []
    processes = Lender(list(range(args.prep_processes)))
    by_length = settings.get("prep_lanes", "1") == "1"  # 0: the processes go to waiting tasks in arrival order
    started = time.perf_counter()
    created, submitted, done = ([0.0] * len(lengths) for _ in range(3))

    def task(i: int, new_tokens: int) -> None:
        created[i] = started + args.submit_s * i / len(lengths)
        time.sleep(max(0.0, created[i] - time.perf_counter()))
        with batcher.expect():
            process = processes.take(new_tokens if by_length else 0)
            time.sleep(args.prep_ms / 1000)
            processes.give(process)
            submitted[i] = time.perf_counter()
        future = batcher.submit(f"job{i}", TimedPrompt(PROMPT_TOKENS, new_tokens))
        future.result()
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=task, args=(i, n), daemon=True) for i, n in enumerate(lengths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = max(done) - started
    latencies = [d - c for c, d in zip(created, done, strict=True)]
    shorts = [i for i, n in enumerate(lengths) if n <= 32]
    short = [latencies[i] for i in shorts]
    parts = {"prepared": [submitted[i] - created[i] for i in shorts],
             "waited": [decoder.admitted[f"job{i}"] - submitted[i] for i in shorts],
             "ran": [done[i] - decoder.admitted[f"job{i}"] for i in shorts]}
    time.sleep(0.1)  # a run is reported just after its last row resolved
    return {"runs": len(runs), "short_parts": {k: statistics.median(v) for k, v in parts.items() if v},
            "jobs_s": len(lengths) / elapsed, "tokens_s": sum(lengths) / elapsed, "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95), "short_p50": percentile(short, 0.5) if short else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--mixed-jobs", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lengths", default="16:512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cap", type=int, default=256)
    parser.add_argument("--pool-tokens", type=int, default=280_000, help="KV pool (H200: ~110 GB of 393 KB tokens)")
    parser.add_argument("--submit-s", type=float, default=0.5, help="the jobs' creation spread over this")
    parser.add_argument("--prep-processes", type=int, default=4)
    parser.add_argument("--prep-ms", type=float, default=24.0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    args = parser.parse_args()
    variants = dict(_variant(text) for text in args.variant) or {"default": {}}
    low, high = (int(x) for x in args.lengths.split(":"))
    mixed = mixed_lengths(args.mixed_jobs, low, high, args.seed)
    print(f"timed decoder (H200 costs), cap {args.cap}, pool {args.pool_tokens} tokens, {args.prep_processes} x "
          f"{args.prep_ms:.0f} ms preparing, jobs created over {args.submit_s} s", flush=True)
    for name, settings in variants.items():
        forced = run([args.new_tokens] * args.jobs, args, settings)
        result = run(mixed, args, settings)
        print(f"{name:>12} {settings or ''}: forced {forced['jobs_s']:.2f} jobs/s {forced['tokens_s']:.0f} tok/s | "
              f"mixed {result['jobs_s']:.2f} jobs/s {result['tokens_s']:.0f} tok/s "
              f"({result['tokens_s'] / forced['tokens_s']:.2f}x) in {result['runs']} run(s), "
              f"p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s,"
              f" <= 32 tokens p50 {result['short_p50']:.2f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in result["short_parts"].items()) + ")", flush=True)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in pairs.split(",") if pair)


if __name__ == "__main__":
    main()
