"""gunicorn's hooks for the API (`--config python:api.gunicorn_conf`): Prometheus counters summed over processes.

Each gunicorn worker process counts its own requests; prometheus-client's multiprocess mode has every process
write its counters to files in one folder, and /metrics sums them. The folder is fresh for each master, so
counts never carry over from an earlier run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_folder: str | None = None


def on_starting(server) -> None:
    """Before the workers fork: a new, empty folder for this master's metric files."""
    global _folder
    _folder = tempfile.mkdtemp(prefix="visionq-api-metrics-")
    # prometheus-client reads this variable when a worker first imports it (after the fork).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _folder


def on_exit(server) -> None:
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
