"""A worker killed mid-job: the job is redelivered and ends in exactly one terminal state, never two."""

from __future__ import annotations

import signal
import time

import pytest

from shared.client import Client
from shared.embedded_redis import free_port
from shared.launcher import Stack
from shared.store import JobStore, connect
from tests.conftest import settings_env

# Jobs long enough to kill mid-run on the tiny model; abandoned ones are redelivered after 3 s (a live worker
# renews its job's lease every 0.5 s).
FAULT_ENV = {"VISIONQ_JOB_TIMEOUT_S": "2", "VISIONQ_VISIBILITY_TIMEOUT_S": "3", "VISIONQ_RESTORE_INTERVAL_S": "1",
             "VISIONQ_HEARTBEAT_S": "0.5",
             "VISIONQ_MAX_ATTEMPTS": "2", "VISIONQ_QUEUE": "visionq-faults"}


@pytest.fixture(scope="module")
def fault_stack(settings, tmp_path_factory):
    faulty = settings.model_copy(update={"queue": "visionq-faults"})
    env = {**settings_env(settings), **FAULT_ENV}
    with Stack(faulty, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("fault-logs")) as stack:
        yield stack


def wait_for_attempt(store: JobStore, job_id: str, attempt: int, timeout_s: float = 30) -> None:
    """Wait until the job's `attempt`-th run has started."""
    deadline = time.monotonic() + timeout_s
    while store.get(job_id).attempts < attempt:
        assert time.monotonic() < deadline, f"attempt {attempt} never started"
        time.sleep(0.02)


def kill_worker_mid_job(stack: Stack, store: JobStore, job_id: str, attempt: int = 1) -> None:
    wait_for_attempt(store, job_id, attempt)
    stack.stop_process("worker", signal.SIGKILL)
    assert store.get(job_id).status.value == "running"
    stack.start_worker()
    stack.wait_for_worker(stack.worker_name, timeout_s=60)


def test_job_of_a_killed_worker_is_run_again_and_succeeds_once(fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    long_job = client.submit("describe", ["bar_chart.png"], max_new_tokens=1024)
    queued_behind = client.submit("ocr", ["book_cover.png"], max_new_tokens=8)
    kill_worker_mid_job(fault_stack, store, long_job["id"])
    finished = client.wait(long_job["id"], timeout_s=120)
    assert finished["status"] == "succeeded"
    assert finished["attempts"] == 2
    behind = client.wait(queued_behind["id"], timeout_s=60)
    assert behind["status"] == "succeeded" and behind["attempts"] == 1


def test_job_that_keeps_killing_its_worker_fails_as_worker_lost(fault_stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    client = Client(fault_stack.api_url, key=fault_stack.api_key)
    job = client.submit("describe", ["street_night.png"], max_new_tokens=1024)
    kill_worker_mid_job(fault_stack, store, job["id"], attempt=1)
    kill_worker_mid_job(fault_stack, store, job["id"], attempt=2)  # the second run dies too
    finished = client.wait(job["id"], timeout_s=60)
    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "worker_lost"
    assert finished["attempts"] == 3


def test_a_worker_whose_model_cannot_load_exits_instead_of_serving(settings, tmp_path):
    broken = settings.model_copy(update={"queue": "visionq-broken", "model": str(tmp_path / "no-such-model")})
    env = {**settings_env(broken), "VISIONQ_QUEUE": "visionq-broken"}
    stack = Stack(broken, env=env, log_dir=tmp_path, api=False)
    with pytest.raises(RuntimeError, match="worker exited with 3"):
        stack.start(timeout_s=60)
    stack.stop()
