"""Garbage-collector pauses of the API's gunicorn workers under submit load, with and without the import-time
heap frozen (api/gunicorn_conf.py: post_worker_init), in the same run.

    python -m bench.gc_pauses [--seconds 10] [--rounds 2]

Serves visionq as bench/load.py does (embedded Redis, the `visionq api` gunicorn settings, wrk POST /v1/jobs with
auth on) with this module as gunicorn's config: its hooks are the API's, plus a gc callback in each worker that
writes the length of every collection to a file. Prints per generation: collections, longest and total pause.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from api import gunicorn_conf as api_hooks
from bench import load
from cli.embedded_redis import free_port
from cli.stack import api_command

on_starting, on_exit = api_hooks.on_starting, api_hooks.on_exit


def post_worker_init(worker) -> None:
    """The API's hook when BENCH_FREEZE is 1, then a callback timing each collection of this process."""
    if os.environ.get("BENCH_FREEZE") == "1":
        api_hooks.post_worker_init(worker)
    out = open(Path(os.environ["BENCH_GC_DIR"]) / f"{os.getpid()}.txt", "w")  # noqa: SIM115 (the process's life)
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            out.write(f"{info['generation']} {(time.perf_counter() - started[0]) * 1000:.3f}\n")
            out.flush()

    gc.callbacks.append(timed)


def pauses(folder: Path) -> dict[int, list[float]]:
    found: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for file in folder.glob("*.txt"):
        for line in file.read_text().splitlines():
            generation, ms = line.split()
            found[int(generation)].append(float(ms))
    return found


def run(freeze: bool, setup: load.Setup, seconds: int, connections: int) -> None:
    port = free_port()
    command = api_command(setup.settings, port)
    command[command.index("python:api.gunicorn_conf")] = "python:bench.gc_pauses"
    with tempfile.TemporaryDirectory() as gc_dir:
        env = {**setup.env, "BENCH_FREEZE": "1" if freeze else "0", "BENCH_GC_DIR": gc_dir,
               "PYTHONPATH": os.getcwd()}
        process = load.gunicorn(command, env)
        try:
            load.wrk(f"http://127.0.0.1:{port}/v1/jobs", "POST", setup.body, setup.secret, 2, connections,
                     setup.folder)  # warm-up: every thread of every worker has served
            result = load.wrk(f"http://127.0.0.1:{port}/v1/jobs", "POST", setup.body, setup.secret, seconds,
                              connections, setup.folder)
        finally:
            process.terminate()
            process.wait()
        found = pauses(Path(gc_dir))
    figures = "  ".join(f"gen{g} {len(v):4d}x max {max(v, default=0):6.2f} ms total {sum(v):6.1f} ms"
                        for g, v in found.items())
    print(f"{'frozen' if freeze else 'not frozen':<11} {result['rps']:6.0f} req/s p99 {result['p99_ms']:6.2f} ms  "
          f"{figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with load.setup() as setup:
        for _ in range(args.rounds):
            for freeze in (False, True):
                run(freeze, setup, args.seconds, args.connections)


if __name__ == "__main__":
    main()
