"""GPU throughput of visionq against the seed loop and plain batched `generate`, measured in the same run.

    python -m bench.gpu_throughput --num-crops 4 [--num-crops-mix 4,16] [--jobs 256] [--caps 1,16,64,128] [--gpus 0]
                                   [--lengths 16:512]

Workload: Phi-3-vision of the real shape with random weights (tests/data/phi3_vision_128k_config.json: Phi-3-mini
decoder, hidden 3072, 32 layers; CLIP ViT-L/14-336), bf16, SDPA, describe jobs on one 336x336 image, greedy,
128 new tokens forced (the saved generation config has no end-of-sequence token, so every job does the same
work). Baselines, in this process: the seed loop (one `generate` per job, dynamic cache) and plain batched
`generate` (one call per batch). visionq: the real path, through HTTP API (gunicorn) -> Redis -> GPU worker(s) ->
Redis, with `--jobs` queued at once, at each batch cap (VISIONQ_MAX_BATCH); then the latency of one job alone on
an idle worker. jobs/s counts from the first submit to the last job stored.

With `--lengths LO:HI`, each cap also runs the mixed workload beside the forced one: `--mixed-jobs` jobs whose
max_new_tokens are log-uniform in LO..HI (seeded by `--seed`; the model has no end-of-sequence token, so each job
makes exactly that many), and prints output tokens/s, its ratio to the forced run's, and the p50 latency of the
jobs of at most 32 tokens.

Each job sets its own `num_crops` through the API (`--num-crops`, or `--num-crops-mix 4,16`: the jobs take the
listed counts in turn, so one batch mixes them); the saved processor's own setting is `--num-crops` and is what
the baselines run with.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from bench.phi3v_gpu import CONFIG, build_and_save, image, synced
from cli.client import Client
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.config import Settings
from shared.jobs import JobStatus
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry
from worker.prompts import phi3_prompt

QUESTION = "Describe this image in detail."


def build_model(folder: Path, num_crops: int) -> None:
    """Random real-shape weights, the Phi-3-V processor at `num_crops`, and no end-of-sequence token."""
    from transformers import GenerationConfig

    from cli.tiny_model import build_phi3v_tokenizer
    from worker.models.phi3v import Phi3VImageProcessor, Phi3VProcessor

    print(f"build + save_pretrained: {build_and_save(folder, CONFIG, 'cuda'):.1f} s", flush=True)
    Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), build_phi3v_tokenizer()).save_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = None
    config.save_pretrained(folder)


def baselines(folder: Path, jobs: int, seed_jobs: int, batches: list[int], new_tokens: int, num_crops: int) -> float:
    """The seed loop and plain batched generate; returns the seed loop's jobs/s (the ratios' denominator)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to("cuda").eval()
    text = phi3_prompt(1, QUESTION)
    images = [image(336, 336, seed=i) for i in range(max(batches + [seed_jobs]))]
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

    def generate(count: int, model=model) -> float:
        inputs = processor(text=[text] * count if count > 1 else text, images=images[:count], return_tensors="pt",
                           num_crops=num_crops)
        inputs = inputs.to("cuda", torch.bfloat16)
        started = synced()
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
        return synced() - started

    generate(1)  # warm-up
    seed_s = [generate(1) for _ in range(seed_jobs)]
    seed_rate = seed_jobs / sum(seed_s)
    print(f"seed loop (one generate per job, {seed_jobs} jobs): {seed_rate:.2f} jobs/s, "
          f"{statistics.median(seed_s):.2f} s a job", flush=True)
    for batch in batches:
        seconds = generate(batch)
        print(f"plain batched generate, batch {batch}: {batch / seconds:.2f} jobs/s "
              f"({batch / seconds / seed_rate:.1f}x seed loop)", flush=True)
    del model
    torch.cuda.empty_cache()
    return seed_rate


class GpuSampler:
    """nvidia-smi every 0.2 s: mean utilisation and peak memory of the given GPUs while a run lasts."""

    def __init__(self, gpus: str):
        self.gpus, self.util, self.memory, self.running = gpus, [], [], True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_exc):
        self.running = False
        self.thread.join()

    def _sample(self) -> None:
        while self.running:
            try:
                out = subprocess.run(["nvidia-smi", "-i", self.gpus, "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                for line in out.stdout.strip().splitlines():
                    util, memory = (float(x) for x in line.split(","))
                    self.util.append(util)
                    self.memory.append(memory)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def summary(self) -> str:
        if not self.util:
            return "GPU util n/a"
        return f"GPU util mean {statistics.mean(self.util):.0f}%, memory peak {max(self.memory) / 1024:.1f} GiB"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def mixed_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """max_new_tokens log-uniform in low..high, the same list for the same seed."""
    rng = random.Random(seed)
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))) for _ in range(count)]


def run_jobs(client: Client, store: JobStore, lengths: list[int], images: list[str], crops: list[int]) -> dict:
    """Queue one job per entry of `lengths` (its max_new_tokens; its num_crops: `crops` in turn) at once and wait
    for all; jobs/s, output tokens/s, latency percentiles (all jobs, and those of at most 32 tokens), and how many
    ran twice."""
    started = time.perf_counter()
    ids = [client.submit("describe", [images[i % len(images)]], max_new_tokens=new_tokens,
                         num_crops=crops[i % len(crops)])["id"]
           for i, new_tokens in enumerate(lengths)]
    submitted = time.perf_counter() - started
    pending = set(ids)
    while pending:
        time.sleep(0.02)
        pending = {job_id for job_id in pending if not store.status(job_id).is_terminal()}
    elapsed = time.perf_counter() - started
    jobs = [store.get(job_id) for job_id in ids]
    bad = [job for job, new_tokens in zip(jobs, lengths, strict=True)
           if job.status != JobStatus.SUCCEEDED or job.result.tokens.completion != new_tokens]
    latencies = [(job.finished_at - job.created_at).total_seconds() for job in jobs]
    short = [latency for latency, new_tokens in zip(latencies, lengths, strict=True) if new_tokens <= 32]
    # Where a short job's time went (medians, ms): before its task started, fetching and preparing its images, and
    # from its submit to the GPU thread until its result (waiting for a row, prefill, decode).
    short_parts = {part: statistics.median(getattr(job.result.timings, part) for job, new_tokens in
                                           zip(jobs, lengths, strict=True) if new_tokens <= 32 and job.result)
                   for part in ("queue_ms", "images_ms", "inference_ms")} if short else {}
    tokens = sum(job.result.tokens.completion for job in jobs if job.result)
    return {"jobs_s": len(ids) / elapsed, "tokens_s": tokens / elapsed, "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95), "short_p50": percentile(short, 0.5) if short else float("nan"),
            "shorts": len(short), "short_parts": short_parts, "elapsed": elapsed, "submit_s": submitted,
            "bad": len(bad),
            "twice": sum(job.attempts > 1 for job in jobs),
            "first_bad": bad[0].model_dump(mode="json") if bad else None}


class ServerLoad:
    """Redis commands/s and CPU, and the API's CPU (gunicorn, all its processes), over a run: is either the
    bottleneck? CPU is in cores (1.0 = one core busy the whole run)."""

    def __init__(self, redis_client, api_pid: int):
        self.redis, self.api_pid = redis_client, api_pid

    def __enter__(self):
        self.started, self.before = time.perf_counter(), self._sample()
        return self

    def __exit__(self, *_exc):
        self.seconds = time.perf_counter() - self.started
        self.after = self._sample()

    def _sample(self) -> tuple[int, float, float]:
        stats, cpu = self.redis.info("stats"), self.redis.info("cpu")
        return (int(stats["total_commands_processed"]), float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                _tree_cpu_s(self.api_pid))

    def summary(self) -> str:
        commands, redis_cpu, api_cpu = (b - a for a, b in zip(self.before, self.after, strict=True))
        return (f"Redis {commands / self.seconds:.0f} commands/s, {redis_cpu / self.seconds:.2f} cores; "
                f"API {api_cpu / self.seconds:.2f} cores")


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (Linux /proc), 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_tree_cpu_s(int(child)) for child in children)


def start_workers(stack: Stack, gpus: list[str], cap: int, cpu: bool = False,
                  variant: dict[str, str] | None = None) -> list[str]:
    """`visionq workers --gpus ...`: the launcher, one worker per GPU pinned with CUDA_VISIBLE_DEVICES, with the
    variant's settings on top."""
    which = ["--cpu-workers", str(len(gpus))] if cpu else ["--gpus", ",".join(gpus)]
    env = {**os.environ, **stack.extra_env, "VISIONQ_MAX_BATCH": str(cap), "VISIONQ_REDIS_URL": stack.redis_url,
           **(variant or {})}
    log = open(stack.log_dir / f"workers-{cap}-{len(gpus)}.log", "ab")  # noqa: SIM115 (closed with the process)
    host = socket.gethostname()
    names = [f"cpu{i}@{host}" for i in range(len(gpus))] if cpu else [f"gpu{gpu}@{host}" for gpu in gpus]
    registry = WorkerRegistry(stack.redis_client())
    earlier = {name: registry.info(name).get("pid") for name in names}  # a stopped worker's facts stay until then
    stack.processes["workers"] = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "workers", *which, "--log-dir", str(stack.log_dir)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    for name in names:
        deadline = time.monotonic() + 300
        while not registry.info(name).get("loads") or registry.info(name).get("pid") == earlier[name]:
            if stack.processes["workers"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {stack.log_dir}")
            time.sleep(0.2)
    return names


def stop_workers(stack: Stack, names: list[str]) -> None:
    """SIGTERM to the supervisor: a warm stop of every worker."""
    stack.stop_process("workers", timeout_s=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-crops", type=int, default=4, help="every job's num_crops (and the processor's own)")
    parser.add_argument("--num-crops-mix", default="", help="e.g. 4,16: the jobs' num_crops in turn, instead")
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--caps", default="1,16,64,128")
    parser.add_argument("--gpus", default="0", help="comma-separated; one worker per GPU (a row per prefix: 1, 2, ...)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed-jobs", type=int, default=2)
    parser.add_argument("--generate-batches", default="16,64")
    parser.add_argument("--dir", default="")
    parser.add_argument("--model", default="", help="an existing model folder (e.g. a tiny one for a CPU dry run)")
    parser.add_argument("--lengths", default="", help="LO:HI: also the mixed workload, max_new_tokens log-uniform")
    parser.add_argument("--mixed-jobs", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-forced", action="store_true", help="only the mixed workload")
    parser.add_argument("--idle-jobs", type=int, default=8,
                        help="lone jobs timed after the graph capture's (0: no idle run)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="worker settings to run each cap with, in turn (repeatable; default: as they are), "
                             "e.g. --variant budget4k:VISIONQ_STEP_PREFILL_TOKENS=4096 --variant budget16k:...")
    args = parser.parse_args()
    variants = dict(parse_variant(text) for text in args.variant) or {"default": {}}
    crops = [int(n) for n in args.num_crops_mix.split(",") if n] or [args.num_crops]

    work = Path(args.dir or tempfile.mkdtemp(prefix="visionq-bench-"))
    model_dir, image_dir = Path(args.model) if args.model else work / "model", work / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(16):
        image(336, 336, seed=1000 + i).save(image_dir / f"img{i}.png")
        images.append(f"img{i}.png")
    device = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}, "
          f"workload: Phi-3-vision real shape, random bf16 weights, SDPA, describe on one 336x336 image, "
          f"num_crops per job {'/'.join(map(str, crops))}, {args.new_tokens} new tokens forced, greedy", flush=True)
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.num_crops)
    batches = [int(b) for b in args.generate_batches.split(",") if b]
    seed_rate = baselines(model_dir, args.jobs, args.seed_jobs, batches, args.new_tokens, args.num_crops) \
        if args.seed_jobs else None

    settings = Settings(model=str(model_dir), image_root=image_dir, data_dir=work / "data", queue="bench",
                        api_port=free_port(), max_new_tokens_limit=max(1024, args.new_tokens))
    env = {"VISIONQ_MODEL": str(model_dir), "VISIONQ_IMAGE_ROOT": str(image_dir), "VISIONQ_QUEUE": "bench",
           "VISIONQ_DATA_DIR": str(work / "data"), "VISIONQ_RATE_PER_S": "100000", "VISIONQ_RATE_BURST": "100000",
           # The folder's name is no Phi-3-vision id: name it as a model whose jobs may set num_crops.
           "VISIONQ_NUM_CROPS_MODELS": json.dumps([str(model_dir)])}
    gpus = args.gpus.split(",")
    with Stack(settings, env=env, api_port=settings.api_port, log_dir=work / "logs", worker=False) as stack:
        client = Client(stack.api_url, key=stack.api_key, timeout_s=120)
        store = JobStore(stack.redis_client(), 3600)
        for cap, (variant, settings_of) in itertools.product([int(c) for c in args.caps.split(",")],
                                                             variants.items()):
            if len(variants) > 1:
                print(f"variant {variant}: {settings_of or 'the settings as they are'}", flush=True)
            for count in range(1, len(gpus) + 1):
                names = start_workers(stack, gpus[:count], cap, cpu=not torch.cuda.is_available(),
                                      variant=settings_of)
                forced_jobs = max(16, min(args.jobs, 4 * cap)) * count
                workloads = [] if args.skip_forced else [("forced", [args.new_tokens] * forced_jobs)]
                if args.lengths:
                    low, high = (int(x) for x in args.lengths.split(":"))
                    workloads.append((f"mixed {low}:{high}", mixed_lengths(args.mixed_jobs * count, low, high,
                                                                            args.seed)))
                forced_tokens_s = None
                for label, lengths in workloads:
                    result = run_workload(client, store, stack, names, gpus[:count], cap, label, lengths, images,
                                          crops, seed_rate, forced_tokens_s)
                    if label == "forced":
                        forced_tokens_s = result["tokens_s"]
                if args.idle_jobs and count == 1 and cap == max(int(c) for c in args.caps.split(",")):
                    idle_latency(client, WorkerRegistry(store.redis), names[0], images, args.new_tokens, crops[0],
                                 args.idle_jobs)
                stop_workers(stack, names)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`small:VISIONQ_STEP_PREFILL_TOKENS=2048,VISIONQ_PREPROCESS_PROCESSES=8` -> ("small", {...})."""
    name, _, pairs = text.partition(":")
    settings = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    if not name or any(not key.startswith("VISIONQ_") for key in settings):
        raise SystemExit(f"--variant {text!r}: expected NAME:VISIONQ_VAR=VALUE[,VISIONQ_VAR=VALUE]")
    return name, settings


def run_workload(client: Client, store: JobStore, stack: Stack, names: list[str], gpus: list[str], cap: int,
                 label: str, lengths: list[int], images: list[str], crops: list[int], seed_rate: float | None,
                 forced_tokens_s: float | None) -> dict:
    """A warm-up of `cap` jobs of the same lengths (captures this cap's graphs), then the measured run."""
    run_jobs(client, store, lengths[:cap * len(gpus)], images, crops)
    registry = WorkerRegistry(store.redis)
    before = [registry.info(name) for name in names]
    with GpuSampler(",".join(gpus)) as sampler, \
            ServerLoad(stack.redis_client(), stack.processes["api"].pid) as load:
        result = run_jobs(client, store, lengths, images, crops)
    infos = [registry.info(name) for name in names]
    ratio = f", {result['jobs_s'] / seed_rate:.0f}x seed loop" if seed_rate else ""
    versus = f" ({result['tokens_s'] / forced_tokens_s:.2f}x the forced run's tokens/s)" if forced_tokens_s else ""
    print(f"visionq {label}, num_crops {'/'.join(map(str, crops))}, cap {cap:>3}, {len(gpus)} GPU worker(s), "
          f"{len(lengths)} jobs "
          f"(mean {statistics.mean(lengths):.0f} tokens): {result['jobs_s']:.2f} jobs/s{ratio}, "
          f"{result['tokens_s']:.0f} output tokens/s{versus}; latency p50 {result['p50']:.2f} s, "
          f"p95 {result['p95']:.2f} s, jobs of <= 32 tokens p50 {result['short_p50']:.2f} s ({result['shorts']} jobs); "
          f"{sampler.summary()}; most rows at once {max(int(i.get('peak_rows', 0)) for i in infos)}, "
          f"fused kernels {infos[0].get('fused')}, "
          f"worker peak {max(float(i.get('gpu_peak_gib', 0)) for i in infos):.1f} GiB; "
          f"submit {result['submit_s']:.2f} s; not succeeded with their tokens: {result['bad']}, "
          f"ran twice: {result['twice']}", flush=True)
    print(f"  {load.summary()}", flush=True)
    if result["short_parts"]:
        print("  jobs of <= 32 tokens, medians: " + ", ".join(f"{k} {v:.0f}" for k, v in result["short_parts"].items()),
              flush=True)
    runs = sum(int(i.get("batches", 0)) for i in infos) - sum(int(i.get("batches", 0)) for i in before)
    seconds = {field: sum(float(i.get(field, 0)) for i in infos) - sum(float(i.get(field, 0)) for i in before)
               for field in ("prefill_s", "decode_s", "idle_s")}
    print(f"  GPU thread over the measured run's {runs} run(s) (idle to idle): prefill {seconds['prefill_s']:.2f} s, "
          f"decode {seconds['decode_s']:.2f} s, idle before them {seconds['idle_s']:.2f} s", flush=True)
    if result["first_bad"]:
        print("  first bad job:", json.dumps(result["first_bad"])[:400])
    return result


def idle_latency(client: Client, registry: WorkerRegistry, name: str, images: list[str], new_tokens: int,
                 num_crops: int, jobs: int = 8) -> None:
    """One job at a time on an idle worker, client-side from submit to result (?wait): the first (it captures the
    one-row graph), then `jobs` more and their median (a lone job's time moves by ±0.03 s from one to the next)."""
    seconds, timings = [], []
    for i in range(1 + jobs):
        before = registry.info(name)
        started = time.perf_counter()
        job = client.submit("describe", [images[i % len(images)]], max_new_tokens=new_tokens, num_crops=num_crops)
        done = client.wait(job["id"], timeout_s=60)
        assert done["status"] == "succeeded", done
        seconds.append(time.perf_counter() - started)
        timings.append(done["result"]["timings"])
    print(f"idle single job, {new_tokens} tokens, submit to result: first {seconds[0]:.2f} s (captures the batch-1 "
          f"graph), then {', '.join(f'{s:.2f}' for s in seconds[1:])} s: median {statistics.median(seconds[1:]):.3f} s",
          flush=True)
    # Where the last one's time went, as the worker measured it (inference: preprocessing, prefill and decode).
    time.sleep(0.5)  # the run's figures are recorded when it ends, just after its last result
    after = registry.info(name)
    gpu = {field: (float(after.get(field, 0)) - float(before.get(field, 0))) * 1000
           for field in ("prefill_s", "decode_s", "idle_s")}
    print("  last job's timings: " + ", ".join(f"{k} {v:.0f} ms" for k, v in timings[-1].items())
          + "; its GPU thread run: " + ", ".join(f"{k} {v:.0f} ms" for k, v in gpu.items()), flush=True)
    # What the job's timings do not cover: on the server, from the end of inference to the stored end (the result
    # stored); outside it, the client's two requests and the ?wait's wake-up (client total - created to finished).
    server = (_instant(done["finished_at"]) - _instant(done["created_at"])) * 1000
    print(f"  last job: created to finished {server:.0f} ms, of which not in its timings "
          f"{server - sum(timings[-1].values()):.0f} ms; client total minus that {seconds[-1] * 1000 - server:.0f} ms",
          flush=True)


def _instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    sys.exit(main())
