"""How much the worker's preprocessing (image decode + the processor) stalls its GPU thread, with and without the
preprocessing pool (worker/preprocess.py), on the CPU with the tiny Phi-3-vision.

    python -m bench.cpu_side [--rate 40] [--seconds 10] [--processes 0,2] [--size 336x336] [--num-crops 4]

A stand-in GPU thread loops steps: `--launches` tiny torch ops (each gives the GIL up and must take it back, as a
kernel launch does: an eager prefill makes hundreds), a little Python (what the real step does on the host:
settle the rows; `--host-ms`), then a wait with the GIL released (the GPU's part, `--step-ms`). Task threads
prepare jobs meanwhile at `--rate` jobs/s (the issue's goal is 40 on one H200), in this process (`--processes 0`)
or through the pool. Printed per mode: the jobs prepared, a job's wall time and the CPU time its task thread spent
in this process (inline: everything, much of it holding the GIL; pool: sending the bytes and unpickling the
tensors), and the GPU thread's stall per step (its step's time beyond the same step alone: waiting for the GIL,
and for a core) with the step rate relative to alone, the measure behind the issue's
"the system reaches 0.95x of the decoder alone".
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.phi3v_gpu import image
from shared.config import Settings
from worker.encoder import Encoder
from worker.preprocess import Preprocessor

QUESTION = "Describe this image in detail."


class GpuThread:
    """Steps of `host_s` Python then `gpu_s` with the GIL released; each step's wall time."""

    def __init__(self, host_s: float, gpu_s: float, launches: int):
        self.host_s, self.gpu_s, self.launches, self.steps, self.running = host_s, gpu_s, launches, [], True
        self.tensor = torch.zeros(8)
        self.thread = threading.Thread(target=self._loop, name="gpu", daemon=True)

    def _host_work(self) -> None:
        for _ in range(self.launches):
            self.tensor.add_(1)
        deadline = time.perf_counter() + self.host_s
        rows = list(range(64))
        while time.perf_counter() < deadline:  # small Python operations, like settling rows
            rows = [row + 1 for row in rows]

    def _loop(self) -> None:
        while self.running:
            started = time.perf_counter()
            self._host_work()
            time.sleep(self.gpu_s)
            self.steps.append(time.perf_counter() - started)

    def run_for(self, seconds: float) -> list[float]:
        self.thread.start()
        time.sleep(seconds)
        self.running = False
        self.thread.join()
        return self.steps[1:]


def load(preprocessor: Preprocessor, blobs: list[bytes], rate: float, seconds: float, threads: int,
         num_crops: int) -> tuple[list[float], list[float]]:
    """Task threads preparing jobs released at `rate` a second; each job's wall and its thread's CPU seconds."""
    walls, cpus, lock, started = [], [], threading.Lock(), time.perf_counter()
    count = iter(range(10**9))

    def task() -> None:
        while True:
            with lock:
                index = next(count)
            release = started + index / rate
            if release > started + seconds:
                return
            time.sleep(max(0.0, release - time.perf_counter()))
            wall, cpu = time.perf_counter(), time.thread_time()
            preprocessor.prepare([blobs[index % len(blobs)]], QUESTION, 64, num_crops)
            with lock:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.thread_time() - cpu)

    workers = [threading.Thread(target=task, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return walls, cpus


def jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    image(width, height, seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a model folder (default: the tiny Phi-3-vision, built)")
    parser.add_argument("--rate", type=float, default=40.0, help="jobs/s prepared")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", default="0,2", help="modes: pool sizes, 0 = inline")
    parser.add_argument("--threads", type=int, default=8, help="task threads")
    parser.add_argument("--size", default="336x336")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--host-ms", type=float, default=0.5)
    parser.add_argument("--launches", type=int, default=300, help="GIL hand-offs per step (tiny torch ops)")
    parser.add_argument("--step-ms", type=float, default=15.0)
    parser.add_argument("--switch-interval", type=float, default=0.0005, help="as the worker sets it")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    torch.set_num_threads(1)  # as the worker on CUDA
    if args.model:
        model = Path(args.model)
    else:
        from cli.tiny_model import build_tiny_phi3v

        model = build_tiny_phi3v(Path(tempfile.gettempdir()) / "visionq-bench-tiny-phi3v")
    width, height = (int(x) for x in args.size.split("x"))
    blobs = [jpeg(width, height, seed) for seed in range(8)]
    settings = Settings(model=str(model))
    encoder = Encoder(settings.model, False, torch.bfloat16)
    alone = GpuThread(args.host_ms / 1000, args.step_ms / 1000, args.launches).run_for(min(3.0, args.seconds))
    base = statistics.median(alone)
    print(f"model {model}, images {args.size} JPEG, num_crops {args.num_crops}, {args.rate:g} jobs/s for "
          f"{args.seconds:g} s, {args.threads} task threads, switch interval {args.switch_interval * 1000:g} ms; "
          f"GPU thread alone: step {base * 1000:.2f} ms ({args.launches} launches, {args.host_ms:g} ms Python, "
          f"{args.step_ms:g} ms waiting)",
          flush=True)
    for processes in (int(p) for p in args.processes.split(",")):
        measure(Preprocessor(settings, encoder, processes), blobs, base, args)


def measure(preprocessor: Preprocessor, blobs: list[bytes], base: float, args) -> None:
    """One mode: the GPU thread's steps while the task threads prepare jobs at the rate."""
    preprocessor.prepare(blobs[:1], QUESTION, 64, args.num_crops)  # warm
    gpu = GpuThread(args.host_ms / 1000, args.step_ms / 1000, args.launches)
    results: dict = {}

    def prepare_jobs() -> None:
        results["walls"], results["cpus"] = load(preprocessor, blobs, args.rate, args.seconds, args.threads,
                                                 args.num_crops)

    loader = threading.Thread(target=prepare_jobs)
    loader.start()
    steps = gpu.run_for(args.seconds)
    loader.join()
    preprocessor.close()
    stalls = [max(0.0, step - base) * 1000 for step in steps]
    walls, cpus = results["walls"], results["cpus"]
    label = "inline (in the task threads)" if not preprocessor.processes else \
        f"pool of {preprocessor.processes} processes"
    print(f"{label}: {len(walls)} jobs ({len(walls) / args.seconds:.1f}/s), a job "
          f"{statistics.mean(walls) * 1000:.1f} ms wall, {statistics.mean(cpus) * 1000:.2f} ms CPU in this process; "
          f"GPU thread: {len(steps)} steps, stall per step mean {statistics.mean(stalls):.2f} ms, "
          f"p50 {percentile(stalls, 0.5):.2f}, p99 {percentile(stalls, 0.99):.2f}, max {max(stalls):.2f}; "
          f"step rate {base / statistics.mean(steps):.3f}x alone", flush=True)


if __name__ == "__main__":
    main()
