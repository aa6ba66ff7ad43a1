"""gunicorn's hooks for the API (`--config python:api.gunicorn_conf`): Prometheus counters summed over processes,
a garbage collector that leaves the import-time heap alone, and connections closed after
VISIONQ_API_KEEPALIVE_REQUESTS requests.

Each gunicorn worker process counts its own requests; prometheus-client's multiprocess mode has every process
write its counters to files in one folder, and /metrics sums them. The folder is fresh for each master, so
counts never carry over from an earlier run.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

from shared.config import get_settings

_folder: str | None = None
_keepalive_requests = 0  # read in each worker (post_worker_init)


def on_starting(server) -> None:
    """Before the workers fork: a new, empty folder for this master's metric files."""
    global _folder
    _folder = tempfile.mkdtemp(prefix="visionq-api-metrics-")
    # prometheus-client reads this variable when a worker first imports it (after the fork).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _folder


def post_worker_init(worker) -> None:
    """Once a worker has imported the app: read its connection limit, and move everything alive now out of the
    garbage collector's sight.

    The app's imports leave ~73,000 tracked objects (pydantic, Flask, redis, botocore); every full collection
    scanned them all, 55-93 ms under submit load on this 2-core machine (bench/gc_pauses.py), while every thread
    of the process waited. Objects made per request die young and are still collected.
    """
    global _keepalive_requests
    _keepalive_requests = get_settings().api_keepalive_requests
    gc.collect()
    gc.freeze()


def pre_request(worker, req) -> None:
    """The last request a connection may carry answers with `Connection: close`, and the client reconnects.

    A gunicorn process keeps each connection it accepts for its whole life, and the kernel hands a burst of new
    connections to whichever process wakes first: a pool of 32 landed 32:0 or 5:27 as often as evenly, and the
    API then served from one core (2,101 req/s against 6,343 for the same app evenly split, on 2 cores).
    Closing after a bounded number of requests lets every connection be dealt again, as nginx does."""
    if _keepalive_requests and req.req_number >= _keepalive_requests:
        req.must_close = True  # gunicorn's own flag: the response says close and the connection ends


def on_exit(server) -> None:
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
