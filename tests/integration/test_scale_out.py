"""`visionq workers --gpus 0,1` as a real process: pinned, named workers of a second model, jobs routed to each
model's queue, Prometheus metrics of the API and of each worker, a rolling restart (SIGHUP) and a warm stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cli.client import ApiError, Client
from cli.embedded_redis import free_port
from cli.stack import Stack, worker_is_ready
from shared.routing import queue_for
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry
from tests.conftest import settings_env
from tests.ports import free_port_run

HOST = socket.gethostname()
# A lease of 1 s, renewed every 0.25 s, swept for every second: a job that outlasts it is redelivered unless its
# worker renews it.
LEASE_ENV = {"VISIONQ_VISIBILITY_TIMEOUT_S": "1", "VISIONQ_HEARTBEAT_S": "0.25", "VISIONQ_RESTORE_INTERVAL_S": "1"}
LONG_TOKENS = 1900  # about 3 s of the tiny model (it has 2048 positions)
NAMES = [f"gpu0@{HOST}", f"gpu1@{HOST}"]


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> Path:
    from cli.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-b", seed=1)


@pytest.fixture(scope="module")
def scaled(settings, second_model, tmp_path_factory):
    """An API serving the default model and a second one, and the supervisor running two workers of the second."""
    base = settings.model_copy(update={"queue": "scale-out", "models": str(second_model)})
    env = {**settings_env(base), "VISIONQ_QUEUE": "scale-out", "VISIONQ_MODELS": str(second_model),
           "VISIONQ_MAX_NEW_TOKENS_LIMIT": str(LONG_TOKENS), **LEASE_ENV}
    logs = tmp_path_factory.mktemp("scale-out-logs")
    metrics_port = free_port_run(len(NAMES))
    workers_env = {**os.environ, **env, "VISIONQ_MODEL": str(second_model), "VISIONQ_DEVICE": "cpu",
                   "VISIONQ_METRICS_PORT": str(metrics_port)}
    supervisor = subprocess.Popen([sys.executable, "-m", "cli.main", "workers", "--gpus", "0,1", "--log-dir",
                                   str(logs)], env=workers_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with Stack(base, env=env, api_port=free_port(), log_dir=logs, worker=False,
                   batches=False) as api:
            store = JobStore(connect(settings), settings.result_ttl_s)
            pids = [wait_ready(store, name, log_dir=logs) for name in NAMES]
            yield api, supervisor, store, second_model, metrics_port, pids
    finally:
        stop_supervisor(supervisor)


def stop_supervisor(supervisor: subprocess.Popen) -> None:
    """SIGTERM, which the supervisor passes on to its workers; SIGKILL would leave them orphaned, loading models."""
    if supervisor.poll() is None:
        supervisor.terminate()
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()


def wait_ready(store: JobStore, name: str, not_pid: int | None = None, timeout_s: float = 180,
               log_dir: Path | None = None) -> int:
    """The pid of this worker once its (new) process has loaded its model."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = WorkerRegistry(store.redis).info(name)
        if info.get("pid") not in (None, not_pid) and worker_is_ready(info, info["pid"]):
            return info["pid"]
        time.sleep(0.1)
    raise AssertionError(f"{name} did not become ready; its log ends:\n{log_tail(log_dir, name)}")


def log_tail(log_dir: Path | None, name: str, lines: int = 40) -> str:
    log = log_dir / f"{name}.log" if log_dir else None
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log and log.exists() else "(no log)"


def client_of(scaled) -> Client:
    return Client(scaled[0].api_url, key=scaled[0].api_key, timeout_s=30)


def test_each_worker_is_pinned_to_its_gpu_and_named_after_it(scaled):
    _, _, store, model, _, pids = scaled
    for gpu, (name, pid) in enumerate(zip(NAMES, pids, strict=True)):
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if item)
        assert environ["CUDA_VISIBLE_DEVICES"] == str(gpu)
        assert WorkerRegistry(store.redis).info(name)["model"] == str(model)


def test_jobs_go_to_their_models_queue_and_unknown_models_are_refused(scaled, settings):
    api, _, store, model, _, _ = scaled
    client = client_of(scaled)
    done = client.wait(client.submit("ocr", ["book_cover.png"], max_new_tokens=4, model=str(model))["id"], 60)
    assert done["status"] == "succeeded" and done["result"]["model"] == done["model"] == str(model)
    waiting = client.submit("ocr", ["book_cover.png"], max_new_tokens=4)  # the default model: no worker here
    assert waiting["model"] == settings.model
    default_queue = queue_for(settings.model_copy(update={"queue": "scale-out"}), settings.model)
    assert store.redis.llen(default_queue) == 1
    assert client.get(waiting["id"])["status"] == "queued"
    client.cancel(waiting["id"])
    with pytest.raises(ApiError) as refused:
        client.submit("ocr", ["book_cover.png"], model="no/such-model")
    assert (refused.value.status, refused.value.code) == (422, "unknown_model")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url, timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, keys), value in samples.items()
               if sample == name and labels.items() <= dict(keys).items())


def test_metrics_of_the_api_and_of_each_worker(scaled, settings):
    api, _, _, model, metrics_port, _ = scaled
    client_of(scaled).wait(client_of(scaled).submit("ocr", ["book_cover.png"], max_new_tokens=4,
                                                    model=str(model))["id"], 60)
    samples = scrape(f"{api.api_url}/metrics")
    assert total(samples, "visionq_api_requests_total", method="POST", route="/v1/jobs", status="202") >= 1
    assert total(samples, "visionq_api_request_seconds_count", route="/v1/jobs/<job_id>") >= 1
    assert total(samples, "visionq_queue_depth", model=str(model)) == 0
    assert total(samples, "visionq_store_up") == 1 and total(samples, "visionq_workers_alive") >= 2
    assert total(samples, "visionq_jobs_ended_total", status="succeeded") >= 2
    # A worker counts a job just after storing it, so the client may see it succeeded a moment before.
    deadline = time.monotonic() + 5
    while True:
        workers = [scrape(f"http://127.0.0.1:{metrics_port + index}/metrics") for index in range(2)]
        ended = sum(total(w, "visionq_worker_jobs_ended_total", status="succeeded") for w in workers)
        if ended >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ended >= 2
    assert sum(total(w, "visionq_worker_generated_tokens_total") for w in workers) >= 2
    assert sum(total(w, "visionq_worker_inference_seconds_count") for w in workers) >= 2
    assert all(total(w, "visionq_worker_info", model=str(model)) == 1 for w in workers)


def lease_times(store: JobStore, job_id: str) -> set[float]:
    """Every lease time kombu's unacked index shows for this job's message while the job runs."""
    seen: set[float] = set()
    while (job := store.get(job_id)) is not None and not job.status.is_terminal():
        for tag, raw in store.redis.hgetall("unacked").items():
            if json.loads(raw)[0]["headers"]["id"] == job_id and (score := store.redis.zscore("unacked_index", tag)):
                seen.add(score)
        time.sleep(0.05)
    return seen


def test_a_job_that_outlasts_its_lease_runs_once_because_its_worker_renews_it(scaled):
    _, _, store, model, _, _ = scaled
    client = client_of(scaled)
    job = client.submit("describe", ["bar_chart.png"], max_new_tokens=LONG_TOKENS, model=str(model))
    renewals = lease_times(store, job["id"])
    done = client.get(job["id"])
    assert done["status"] == "succeeded"
    assert done["result"]["timings"]["inference_ms"] > 1000  # longer than its lease
    assert len(renewals) >= 3  # delivered, then renewed at least twice while it ran
    assert done["attempts"] == 1  # the idle worker's sweeps left it alone


def test_a_rolling_restart_replaces_every_worker_and_loses_no_job(scaled):
    _, supervisor, store, model, _, _ = scaled
    client = client_of(scaled)
    before = [WorkerRegistry(store.redis).info(name)["pid"] for name in NAMES]
    supervisor.send_signal(signal.SIGHUP)
    with ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda _: client.submit("describe", ["bar_chart.png"], max_new_tokens=4,
                                                     model=str(model))["id"], range(6)))
        after = [wait_ready(store, name, not_pid=pid) for name, pid in zip(NAMES, before, strict=True)]
        finished = list(pool.map(lambda job_id: client.wait(job_id, 90), jobs))
    assert set(after).isdisjoint(before)
    assert [job["status"] for job in finished] == ["succeeded"] * 6


def test_sigterm_stops_the_supervisor_and_its_workers_warmly(scaled):
    _, supervisor, store, _, _, _ = scaled
    pids = [WorkerRegistry(store.redis).info(name)["pid"] for name in NAMES]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
