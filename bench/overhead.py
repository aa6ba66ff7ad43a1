"""System overhead per job: end-to-end latency minus the engine's inference time, tiny model, loopback.

    python -m bench.overhead [--jobs 300]

Runs, in the same process and against the same embedded Redis:
  1. the anchor: a Celery no-op round trip (`noop.delay().get()`, solo worker, Redis broker and backend);
  2. visionq: POST /v1/jobs, then GET /v1/jobs/<id>?wait=30 until the result, through gunicorn, Redis and a
     solo worker on the tiny model with max_new_tokens=1. Overhead = client-side latency - result inference_ms.
Prints p50/p90/p99 of each and visionq's ratio to the anchor. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

from cli.embedded_redis import EmbeddedRedis, free_port
from cli.stack import Stack
from shared.config import Settings


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": statistics.fmean(values)}


def show(name: str, stats: dict[str, float]) -> None:
    print(f"{name:<52} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in stats.items()))


def measure_celery_noop(redis_url: str, jobs: int, log_dir: Path) -> list[float]:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    log = open(log_dir / "noop-worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker", "-P", "solo",
                               "-c", "1", "--without-gossip", "--without-mingle", "-Q", "celery"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        os.environ["BENCH_REDIS_URL"] = redis_url
        from bench.celery_noop import noop

        noop.delay().get(timeout=60)  # waits for the worker to come up
        for _ in range(20):
            noop.delay().get(timeout=10)
        samples = []
        for _ in range(jobs):
            started = time.perf_counter()
            noop.delay().get(timeout=10)
            samples.append((time.perf_counter() - started) * 1000)
        return samples
    finally:
        worker.terminate()
        worker.wait()


class LeanClient:
    """A keep-alive HTTP/1.1 client with nothing on top (requests adds ~0.7 ms a call on this machine)."""

    def __init__(self, port: int, key: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.auth = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {**self.auth, "Content-Type": "application/json"} if body is not None else self.auth
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        return json.loads(self.conn.getresponse().read())

    def run_job(self) -> tuple[dict, float]:
        """Submit, wait for the end; returns the job and the wall-clock time the 202 arrived."""
        job = self.call("POST", "/v1/jobs", {"task": "describe", "images": ["pixel.png"], "max_new_tokens": 1})
        accepted = time.time()
        return self.call("GET", f"/v1/jobs/{job['id']}?wait=30"), accepted


def stamp(job: dict, key: str) -> float:
    return datetime.fromisoformat(job[key]).timestamp()


def measure_visionq(client: LeanClient, jobs: int) -> dict[str, list[float]]:
    """Per job: end to end, overhead, and where the overhead goes (from the job's own timestamps)."""
    for _ in range(20):
        client.run_job()
    samples: dict[str, list[float]] = {}
    for _ in range(jobs):
        started_wall, started = time.time(), time.perf_counter()
        job, accepted = client.run_job()
        elapsed = (time.perf_counter() - started) * 1000
        assert job["status"] == "succeeded", job
        timings = job["result"]["timings"]
        row = {
            "visionq end to end": elapsed,
            "visionq overhead (end to end - inference)": elapsed - timings["inference_ms"],
            "visionq overhead, image load excluded": elapsed - timings["inference_ms"] - timings["images_ms"],
            "  part: submit until 202 received": (accepted - started_wall) * 1000,
            "  part: created until a worker starts it": (stamp(job, "started_at") - stamp(job, "created_at")) * 1000,
            "  part: worker, running minus images and inference": (
                (stamp(job, "finished_at") - stamp(job, "started_at")) * 1000
                - timings["inference_ms"] - timings["images_ms"]),
            "  part: stored until the client has it": (time.time() - stamp(job, "finished_at")) * 1000,
        }
        for key, value in row.items():
            samples.setdefault(key, []).append(value)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    from cli.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis_server:
        tmp_path = Path(tmp)
        model = build_tiny_model(tmp_path / "tiny-llava")
        (tmp_path / "images").mkdir()
        Image.new("RGB", (32, 32), "red").save(tmp_path / "images" / "pixel.png")
        noop = measure_celery_noop(redis_server.url, args.jobs, tmp_path)
        settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, api_workers=1)
        env = {"VISIONQ_MODEL": str(model), "VISIONQ_IMAGE_ROOT": str(tmp_path / "images"),
               "VISIONQ_API_WORKERS": "1", "OMP_NUM_THREADS": "1"}
        with Stack(settings, env=env, api_port=free_port(), log_dir=tmp_path / "logs") as stack:
            samples = measure_visionq(LeanClient(stack.api_port, stack.api_key), args.jobs)
    print(f"{args.jobs} sequential jobs each, tiny model, max_new_tokens=1, loopback, {os.cpu_count()} cores")
    show("anchor: Celery no-op round trip", noop_stats := percentiles(noop))
    for name, values in samples.items():
        show(name, percentiles(values))
    over = percentiles(samples["visionq overhead (end to end - inference)"])
    print(f"ratio to anchor: p50 {over['p50'] / noop_stats['p50']:.2f}x, p99 {over['p99'] / noop_stats['p99']:.2f}x"
          f"   (goal: overhead p50 <= 5 ms, p99 <= 20 ms)")


if __name__ == "__main__":
    main()
