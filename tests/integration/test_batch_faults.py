"""A GPU worker SIGKILLed in the middle of a batch: its unfinished items run again, every item ends exactly once,
and the batch's counts, kept by the transitions, add up to what its items' jobs say."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from cli.client import Client, batch_ended
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.store.connection import connect
from shared.store.keys import batch_key
from tests.conftest import settings_env

# As in test_worker_faults.py: jobs long enough to kill mid-run; abandoned ones come back after 3 s.
FAULT_ENV = {"VISIONQ_VISIBILITY_TIMEOUT_S": "3", "VISIONQ_RESTORE_INTERVAL_S": "1", "VISIONQ_HEARTBEAT_S": "0.5",
             "VISIONQ_MAX_ATTEMPTS": "2", "VISIONQ_QUEUE": "visionq-batch-faults",
             "VISIONQ_MAX_NEW_TOKENS_LIMIT": "1200"}
LONG = 1200


@pytest.fixture(scope="module")
def fault_stack(settings, tmp_path_factory):
    faulty = settings.model_copy(update={"queue": "visionq-batch-faults"})
    stack = Stack(faulty, env={**settings_env(settings), **FAULT_ENV}, api_port=free_port(),
                  log_dir=tmp_path_factory.mktemp("batch-fault-logs"), webhooks=False)
    # Names of their own: the session stack's worker is worker1@<host> in the same registry.
    stack.worker_name, stack.batches_name = f"batch-faults@{socket.gethostname()}", "batch-faults-batches@test"
    with stack:
        yield stack


def test_a_worker_killed_mid_batch_leaves_every_item_to_end_once(fault_stack, settings):
    client = Client(fault_stack.api_url, key=fault_stack.api_key, timeout_s=30)
    requests = [{"custom_id": f"part-{i}", "images": ["bar_chart.png"], "question": f"Describe part {i}."}
                for i in range(24)]
    batch = client.create_batch(requests=requests, task="describe", max_new_tokens=LONG)
    deadline = time.monotonic() + 60
    while client.batch(batch["id"])["counts"]["running"] < 3:
        assert time.monotonic() < deadline, "no item started"
        time.sleep(0.02)
    fault_stack.stop_process("worker", signal.SIGKILL)
    interrupted = client.batch(batch["id"])["counts"]["running"]
    assert interrupted > 0
    fault_stack.start_worker()
    fault_stack.wait_for_worker(fault_stack.worker_name, timeout_s=60)
    ended = client.wait_batch(batch["id"], timeout_s=240, poll_s=0.2)
    assert batch_ended(ended) and ended["status"] == "completed", ended
    counts = ended["counts"]
    results = list(client.batch_results(batch["id"]))
    assert [line["custom_id"] for line in results] == [line["custom_id"] for line in requests]
    jobs = [client.get(line["id"]) for line in results]
    by_status = {status: sum(job["status"] == status for job in jobs) for status in ("succeeded", "failed")}
    assert (counts["succeeded"], counts["failed"]) == (by_status["succeeded"], by_status["failed"])
    assert counts["items"] == 24 and counts["queued"] == counts["running"] == counts["canceled"] == 0
    assert sum(job["attempts"] == 2 for job in jobs) >= 1  # the interrupted ones ran again...
    assert all(job["attempts"] in (1, 2) for job in jobs)  # ...once
    assert all(job["status"] == "succeeded" or job["error"]["code"] == "worker_lost" for job in jobs)
    stored = connect(settings).hmget(batch_key(batch["id"]), ["ending", "notified"])
    assert stored == ["1", "1"]  # its end was queued once and told once
