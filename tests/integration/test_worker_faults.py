"""A worker killed mid-batch: its unfinished jobs are redelivered and each ends in exactly one terminal state."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time

import pytest

from cli.client import Client
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.store.broker import make_celery
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.keys import KOMBU_UNACKED_MUTEX
from shared.store.workers import WorkerRegistry
from tests.conftest import settings_env
from tests.processes import alive, wait_gone

# Jobs long enough to kill mid-run on the tiny model; abandoned ones are redelivered after 3 s (a live worker
# renews its jobs' leases every 0.5 s, so the long jobs of a live batch are never redelivered).
FAULT_ENV = {"VISIONQ_VISIBILITY_TIMEOUT_S": "3", "VISIONQ_RESTORE_INTERVAL_S": "1", "VISIONQ_HEARTBEAT_S": "0.5",
             "VISIONQ_MAX_ATTEMPTS": "2", "VISIONQ_QUEUE": "visionq-faults", "VISIONQ_MAX_NEW_TOKENS_LIMIT": "1200"}
LONG = 1200  # tokens: a second or more on the tiny model, every one of them decoded (see endless_model)


@pytest.fixture(scope="module")
def endless_model(tiny_model_path, tmp_path_factory):
    """The tiny model without an end-of-sequence token: a row runs to its max_new_tokens, so a kill that comes
    while the long jobs run always interrupts them (with EOS, random weights sometimes end every row early)."""
    path = tmp_path_factory.mktemp("models") / "endless"
    shutil.copytree(tiny_model_path, path, dirs_exist_ok=True)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = None
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def fault_stack(settings, endless_model, tmp_path_factory):
    faulty = settings.model_copy(update={"queue": "visionq-faults", "model": str(endless_model)})
    env = {**settings_env(faulty), **FAULT_ENV}
    with Stack(faulty, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("fault-logs"),
               webhooks=False, batches=False) as stack:
        yield stack


def wait_for_attempt(store: JobStore, job_id: str, attempt: int, timeout_s: float = 30) -> None:
    """Wait until the job's `attempt`-th run has started."""
    deadline = time.monotonic() + timeout_s
    while store.get(job_id).attempts < attempt:
        assert time.monotonic() < deadline, f"attempt {attempt} never started"
        time.sleep(0.02)


def kill_worker_mid_job(stack: Stack, store: JobStore, job_id: str | None = None, attempt: int = 1) -> None:
    if job_id:
        wait_for_attempt(store, job_id, attempt)
    stack.stop_process("worker", signal.SIGKILL)
    if job_id:
        assert store.get(job_id).status.value == "running"
    stack.start_worker()
    stack.wait_for_worker(stack.worker_name, timeout_s=60)


def test_a_short_job_submitted_while_long_ones_decode_ends_before_them(fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    long_jobs = [client.submit("describe", ["bar_chart.png"], question=f"Describe part {i}.", max_new_tokens=LONG)
                 for i in range(3)]
    for job in long_jobs:
        wait_for_attempt(store, job["id"], 1)
    time.sleep(0.5)  # past their prefill: the long rows are decoding
    assert {store.status(job["id"]).value for job in long_jobs} == {"running"}, "the long jobs ended too soon"
    short = client.wait(client.submit("ocr", ["book_cover.png"], max_new_tokens=4)["id"], timeout_s=30)
    assert short["status"] == "succeeded"
    # It joined the running rows and left them: the long ones still decode (the model has no end-of-sequence).
    assert {store.status(job["id"]).value for job in long_jobs} == {"running"}
    for job in long_jobs:
        assert client.wait(job["id"], timeout_s=120)["status"] == "succeeded"


def test_worker_killed_mid_batch_leaves_each_unfinished_job_to_run_again_once(fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    # The rows share one run: the short ones end, are stored and acknowledged while the long ones still decode.
    # Submitted first, they are surely admitted before the kill, also on a slow machine.
    short_jobs = [client.submit("ocr", ["book_cover.png"], max_new_tokens=4) for _ in range(2)]
    long_jobs = [client.submit("describe", ["bar_chart.png"], question=f"Describe part {i}.", max_new_tokens=LONG)
                 for i in range(6)]
    short_done = [client.wait(job["id"], timeout_s=30) for job in short_jobs]
    for job in long_jobs:
        wait_for_attempt(store, job["id"], 1)
    fault_stack.stop_process("worker", signal.SIGKILL)
    interrupted = {job["id"] for job in long_jobs if store.status(job["id"]).value == "running"}
    assert interrupted, "every long row had ended before the kill"
    kill_worker_mid_job(fault_stack, store)  # the worker is down already: this restarts it
    for job in long_jobs:
        finished = client.wait(job["id"], timeout_s=120)
        assert finished["status"] == "succeeded", finished
        assert finished["attempts"] == (2 if job["id"] in interrupted else 1)  # interrupted runs again, once
    for job in short_done:
        assert job["status"] == "succeeded"
        again = client.get(job["id"])
        assert again["attempts"] == 1 and again["finished_at"] == job["finished_at"]  # never run a second time
    info = WorkerRegistry(store.redis).info(fault_stack.worker_name)
    assert info["largest_batch"] >= 2, info  # the killed batch held more than one job


def test_a_worker_killed_while_it_sweeps_for_abandoned_jobs_delays_them_by_a_sweep_not_minutes(
        fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    job = client.submit("describe", ["street_night.png"], max_new_tokens=LONG)
    wait_for_attempt(store, job["id"], 1)
    fault_stack.stop_process("worker", signal.SIGKILL)
    # As if it died inside kombu's sweep: its lock stays, with the expiry the workers' settings give it.
    workers = settings.model_copy(update={"restore_interval_s": int(FAULT_ENV["VISIONQ_RESTORE_INTERVAL_S"])})
    expire = make_celery(workers).conf.broker_transport_options.get("unacked_mutex_expire", 300)
    assert store.redis.lock(KOMBU_UNACKED_MUTEX, timeout=expire).acquire(blocking=False)
    kill_worker_mid_job(fault_stack, store)  # the worker is down already: this restarts it
    finished = client.wait(job["id"], timeout_s=60)
    assert finished["status"] == "succeeded" and finished["attempts"] == 2, finished


def test_job_that_keeps_killing_its_worker_fails_as_worker_lost(fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    job = client.submit("describe", ["street_night.png"], max_new_tokens=LONG)
    kill_worker_mid_job(fault_stack, store, job["id"], attempt=1)
    kill_worker_mid_job(fault_stack, store, job["id"], attempt=2)  # the second run dies too
    finished = client.wait(job["id"], timeout_s=60)
    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "worker_lost"
    assert finished["attempts"] == 3


def test_a_worker_whose_model_cannot_load_exits_instead_of_serving(settings, tmp_path):
    broken = settings.model_copy(update={"queue": "visionq-broken", "model": str(tmp_path / "no-such-model")})
    env = {**settings_env(broken), "VISIONQ_QUEUE": "visionq-broken"}
    stack = Stack(broken, env=env, log_dir=tmp_path, api=False, webhooks=False, batches=False)
    with pytest.raises(RuntimeError, match="worker exited with 3"):
        stack.start(timeout_s=60)
    stack.stop()


def test_a_worker_whose_metrics_port_is_taken_exits_and_says_why(settings, tmp_path):
    """Celery would swallow the bind error of its worker_init handler: the worker would run without a model,
    never ready, and its supervisor would never hear of it."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        blocked = settings.model_copy(update={"queue": "visionq-port", "metrics_port": port})
        env = {**settings_env(blocked), "VISIONQ_QUEUE": "visionq-port", "VISIONQ_METRICS_PORT": str(port)}
        stack = Stack(blocked, env=env, log_dir=tmp_path, api=False, webhooks=False, batches=False)
        with pytest.raises(RuntimeError, match="worker exited with 3"):
            stack.start(timeout_s=60)
        stack.stop()
    assert f"cannot serve metrics on port {port}" in (tmp_path / "worker.log").read_text()


def test_the_workers_preprocessing_processes_end_with_it_on_sigterm_and_on_sigkill(settings, tmp_path):
    pooled = settings.model_copy(update={"queue": "visionq-pool"})
    env = {**settings_env(pooled), "VISIONQ_QUEUE": "visionq-pool", "VISIONQ_PREPROCESS_PROCESSES": "2"}
    stack = Stack(pooled, env=env, log_dir=tmp_path, api=False, webhooks=False, batches=False)
    stack.worker_name = "pool-test@localhost"  # its own record, beside the other stacks' workers
    with stack:
        registry = WorkerRegistry(stack.redis_client())
        for sig in (signal.SIGTERM, signal.SIGKILL):  # a warm stop closes the pool; a kill leaves it to itself
            pids = registry.info(stack.worker_name)["preprocess_pids"]
            assert len(pids) == 2 and all(alive(pid) for pid in pids), pids
            stack.stop_process("worker", sig)
            assert wait_gone(pids) == [], f"left after {sig.name}"
            if sig == signal.SIGTERM:
                stack.start_worker()
                stack.wait_for_worker(stack.worker_name, timeout_s=60)
