"""What one poll costs, split where bench/load.py cannot split it: the API process's CPU and Redis's.

    python -m bench.poll_cost [--rounds 8] [--calls 3000]

In this process, with no HTTP server and no client in the way: the WSGI app is called directly, each case `--calls`
times per round, the cases alternated for `--rounds` rounds (this machine's speed drifts; the median is printed
with every round). Cases: the minimal Flask app doing one Redis GET (bench/baseline_apps.py), visionq's poll of a
finished job and of a queued job with its position (set up as bench/load.py sets them up: behind another key's
500 jobs and 200 of its own), and /healthz. Per case: process CPU per request (time.process_time: the API's own
work, not the wait for Redis), and Redis's time per call of the command the request sends (INFO commandstats),
which under load takes CPU from the same cores.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

from bench.load import finished_job, queued_job, setup
from shared.store.connection import connect
from shared.store.jobs import JobStore


def environ(path: str, secret: str | None = None) -> dict:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
           "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
           "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
           "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0), "REMOTE_ADDR": "127.0.0.1",
           "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "bench"}
    if secret:
        env["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    return env


def call(app, env: dict) -> tuple[str, bytes]:
    status = []
    body = app(dict(env), lambda line, headers, exc_info=None: status.append(line))
    data = b"".join(body)
    if hasattr(body, "close"):
        body.close()
    return status[0], data


def cpu_us(app, env: dict, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        call(app, env)
    return (time.process_time() - started) / calls * 1e6


def redis_us(client, app, env: dict, calls: int) -> str:
    """Redis's own time per call of each command the request sends (the busiest first)."""
    client.config_resetstat()
    for _ in range(calls):
        call(app, env)
    stats = sorted(((name.removeprefix("cmdstat_"), s) for name, s in client.info("commandstats").items()
                    if s["calls"] >= calls and name != "cmdstat_config"), key=lambda kv: -kv[1]["usec"])
    return ", ".join(f"{name} {s['usec_per_call']:.1f} us" for name, s in stats[:2]) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp())  # as under gunicorn (api/gunicorn_conf)
    with setup() as bench:
        os.environ.update({**bench.env, "BENCH_APP": "redis_get"})
        client = connect(bench.settings)
        done = finished_job(JobStore(client, bench.settings.result_ttl_s), bench.key.id)
        waiting = queued_job(JobStore.from_settings(client, bench.settings), bench.key.id, bench.settings)
        from api import create_app
        from bench.baseline_apps import app as baseline
        from shared.config import get_settings

        app = create_app(get_settings())
        cases = {"baseline: Flask GET, one Redis GET": (baseline, environ("/poll")),
                 "visionq poll, finished job": (app, environ(f"/v1/jobs/{done}", bench.secret)),
                 "visionq poll, queued job with its position": (app, environ(f"/v1/jobs/{waiting}", bench.secret)),
                 "visionq /healthz": (app, environ("/healthz"))}
        for name, (wsgi, env) in cases.items():
            status, _ = call(wsgi, env)
            assert status.startswith("200"), (name, status)
        rounds: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (wsgi, env) in cases.items():
                rounds[name].append(cpu_us(wsgi, env, args.calls))
        print(f"process CPU per request, in process (median of {args.rounds} rounds of {args.calls} calls), and "
              f"Redis's time per call:")
        base = statistics.median(rounds[next(iter(cases))])
        for name, (wsgi, env) in cases.items():
            median = statistics.median(rounds[name])
            print(f"  {name:<44} {median:6.1f} us ({median / base:.2f}x the baseline)  rounds "
                  f"{', '.join(f'{v:.0f}' for v in rounds[name])}; Redis: {redis_us(client, wsgi, env, 1000)}")


if __name__ == "__main__":
    main()
