"""Creating a large batch with no GPU worker running: how fast its lines become queued jobs, how soon the first one
is queued, and how much memory the API process (and the batch worker) peak at, for batches of several sizes.

    python -m bench.batch_create [--sizes 10000,50000,100000,200000]

For each size: a JSONL manifest of that many lines (path refs under the image root: checked without reading a
file) is uploaded (POST /v1/uploads, application/jsonl, streamed), then POST /v1/batches {input_file}; the time
until the model's queue holds its first message, and until it holds them all, is measured from the POST, by
polling Redis every 5 ms. Peak memory is each process's high-water mark (VmHWM of /proc/<pid>/status), read after
each size: a peak that does not grow with the batch's size is bounded. The API runs under gunicorn with one worker
process (VISIONQ_API_WORKERS=1), the batch worker with its default threads. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import requests

from cli.embedded_redis import EmbeddedRedis, free_port
from cli.stack import Stack
from shared.config import Settings
from shared.routing import queue_for
from shared.store.api_keys import KeyStore
from shared.store.connection import connect


def peak_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux: VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    """The child processes of `pid` (gunicorn's worker processes)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def manifest(size: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"img-{i:06d}", "task": "describe", "images": [f"photos/{i}.png"]})
                   + "\n" for i in range(size)).encode()


def run_size(api_url: str, secret: str, redis, queue: str, size: int) -> dict:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {secret}"
    data = manifest(size)
    started = time.perf_counter()
    upload = http.post(f"{api_url}/v1/uploads", data=data, headers={"Content-Type": "application/jsonl"}, timeout=600)
    upload.raise_for_status()
    upload_s = time.perf_counter() - started
    before = redis.llen(queue)
    posted = time.perf_counter()
    answer = http.post(f"{api_url}/v1/batches", json={"input_file": upload.json()["uploads"][0]["ref"],
                                                      "max_new_tokens": 8}, timeout=60)
    answer.raise_for_status()
    answered = time.perf_counter() - posted
    first = all_queued = None
    while all_queued is None:
        queued = redis.llen(queue) - before
        now = time.perf_counter() - posted
        if first is None and queued > 0:
            first = now
        if queued >= size:
            all_queued = now
        time.sleep(0.005)
    batch = http.get(f"{api_url}/v1/batches/{answer.json()['id']}", timeout=10).json()
    while not batch["input_done"]:  # its last chunk's progress is recorded just after the chunk is queued
        time.sleep(0.005)
        batch = http.get(f"{api_url}/v1/batches/{answer.json()['id']}", timeout=10).json()
    assert batch["counts"]["items"] == size, batch["counts"]
    return {"size": size, "bytes": len(data), "upload_s": upload_s, "answer_ms": answered * 1000,
            "first_queued_s": first, "all_queued_s": all_queued, "items_per_s": size / all_queued}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000,200000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as redis_server:
        # Past the default 100,000 lines, to see whether memory grows with the size.
        settings = Settings(redis_url=redis_server.url, queue="visionq-bench", data_dir=Path(tmp) / "data",
                            api_workers=1, batch_max_input_bytes=512 * 1024 * 1024, batch_max_items=10**6)
        env = {"VISIONQ_QUEUE": settings.queue, "VISIONQ_API_WORKERS": "1", "VISIONQ_LOG_LEVEL": "WARNING",
               "VISIONQ_BATCH_MAX_INPUT_BYTES": str(settings.batch_max_input_bytes),
               "VISIONQ_BATCH_MAX_ITEMS": str(settings.batch_max_items)}
        with Stack(settings, env=env, api_port=free_port(), log_dir=Path(tmp) / "logs", worker=False,
                   webhooks=False) as stack:
            redis = connect(settings)
            secret, _ = KeyStore(redis).create("bench", rate_per_s=1e6, burst=10**6, max_active_jobs=10**7)
            api_pids = [stack.processes["api"].pid, *children(stack.processes["api"].pid)]
            batch_pid = stack.processes["batches"].pid
            idle = {"api": max(peak_mib(pid) for pid in api_pids), "batches": peak_mib(batch_pid)}
            print(f"idle peaks: API {idle['api']:.1f} MiB, batch worker {idle['batches']:.1f} MiB "
                  f"(API pids {api_pids}, batch worker pid {batch_pid})")
            print(f"{'lines':>8} {'MiB in':>7} {'upload s':>9} {'202 in ms':>10} {'first queued s':>15} "
                  f"{'all queued s':>13} {'items/s':>9} {'API peak MiB':>13} {'batch worker peak MiB':>22}")
            for size in sizes:
                row = run_size(stack.api_url, secret, redis, queue_for(settings, settings.model), size)
                api_peak = max(peak_mib(pid) for pid in api_pids)
                print(f"{row['size']:>8} {row['bytes'] / 2**20:>7.1f} {row['upload_s']:>9.2f} "
                      f"{row['answer_ms']:>10.1f} {row['first_queued_s']:>15.3f} {row['all_queued_s']:>13.2f} "
                      f"{row['items_per_s']:>9.0f} {api_peak:>13.1f} {peak_mib(batch_pid):>22.1f}", flush=True)


if __name__ == "__main__":
    main()
