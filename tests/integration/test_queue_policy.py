"""The queue's policy with real parts (the API over HTTP, Redis, the stack's worker on the tiny model): a key's few
jobs start while another key's backlog is still queued, in the key's own priority order; a waiting job's position
only goes down; a model no worker serves says no_worker (a poll that waits and times out says where the job stands
too); a deadline that passes while queued fails the job once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import requests

from tests.conftest import PARKED_MODEL

BACKLOG = 300
LOWS = 8


def started_at(job: dict) -> datetime:
    return datetime.fromisoformat(job["started_at"])


def test_a_keys_few_jobs_start_before_another_keys_backlog_drains(make_client):
    bulk, small = make_client(rate_per_s=5000, burst=5000), make_client()
    with ThreadPoolExecutor(8) as pool:  # faster than the worker drains them: a real backlog
        backlog = list(pool.map(lambda _: bulk.submit("describe", ["bar_chart.png"], max_new_tokens=16)["id"],
                                range(BACKLOG)))
    with ThreadPoolExecutor(LOWS) as pool:  # at once: every start moves one of the key's jobs onto the list, and
        # lows sent one by one were all there (beyond any reordering) before the high came, on a loaded machine
        lows = list(pool.map(lambda _: small.submit("describe", ["bar_chart.png"], max_new_tokens=4,
                                                    priority="low")["id"], range(LOWS)))
    high = small.submit("describe", ["bar_chart.png"], max_new_tokens=4, priority="high")["id"]
    # High goes ahead of the key's earlier lows still in its line. (Start times cannot show it: a worker's task
    # threads start the jobs it holds in parallel, so two jobs a few turns apart may start in either order.)
    high_position = small.get(high)["queue"]["position"]
    waiting = [(job_id, (small.get(job_id).get("queue") or {}).get("position", -1)) for job_id in lows]
    last_low, last_position = max(waiting, key=lambda pair: pair[1])
    assert high_position < last_position, (high_position, last_position)
    positions = watch_positions(small, last_low)
    mine = {job_id: small.wait(job_id, timeout_s=120) for job_id in [*lows, high]}
    assert all(job["status"] == "succeeded" for job in mine.values())
    theirs = [bulk.wait(job_id, timeout_s=300) for job_id in backlog]
    last_mine = max(started_at(job) for job in mine.values())
    after = sum(started_at(job) > last_mine for job in theirs)
    # The worker holds up to 2 x max_batch jobs and the list 16 more: beyond those, the turns alternate.
    assert after >= BACKLOG - 2 * 64 - 16 - 2 * len(mine), f"only {after} of the backlog started after our jobs"
    assert positions == sorted(positions, reverse=True) and positions[0] > positions[-1], positions


def watch_positions(client, job_id: str) -> list[int]:
    """The job's position at each poll while it is queued (polled in a thread while the test goes on)."""
    seen: list[int] = []

    def poll() -> None:
        while (job := client.get(job_id))["status"] == "queued":
            seen.append(job["queue"]["position"])
            time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    thread.join(timeout=120)
    return seen


def test_a_job_for_a_model_no_worker_serves_says_no_worker(client, api_url, auth):
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)
    place = client.get(job["id"])["queue"]
    assert place["waiting_reason"] == "no_worker" and place["eta_s"] is None and place["position"] >= 0
    queues = {q["model"]: q for q in requests.get(f"{api_url}/v1/queues", headers=auth, timeout=10).json()["queues"]}
    assert queues[PARKED_MODEL]["live_workers"] == 0 and queues[PARKED_MODEL]["queued"] >= 1
    served = next(q for model, q in queues.items() if model != PARKED_MODEL)
    assert served["live_workers"] >= 1
    client.cancel(job["id"])


def test_a_wait_that_times_out_on_a_queued_job_says_where_it_stands_like_a_plain_get(client):
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)
    try:
        started = time.monotonic()
        waited = client.get(job["id"], wait_s=0.5)
        assert time.monotonic() - started >= 0.5 and waited["status"] == "queued"
        assert waited["queue"] == client.get(job["id"])["queue"]  # nothing ahead moved meanwhile: no worker
        assert waited["queue"]["waiting_reason"] == "no_worker"
    finally:
        client.cancel(job["id"])


def test_a_deadline_that_passes_while_queued_fails_the_job_and_tells_its_webhook_once(client, http_server):
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL, start_within_s=0.5,
                        webhook={"url": http_server.url("/deadline-hook")})
    assert job["start_within_s"] == 0.5
    ended = client.wait(job["id"], timeout_s=15)  # a worker's queue tick (every second) ends it
    assert ended["status"] == "failed" and ended["error"]["code"] == "deadline_exceeded"
    assert "started_at" not in ended  # it never ran
    deliveries = client.deliveries(job["id"])
    assert [d["type"] for d in deliveries] == ["job.failed"]


def test_priority_and_start_within_are_checked_with_stable_codes(api_url, auth):
    for body, code in [({"priority": "urgent"}, "invalid_priority"), ({"start_within_s": 0}, "invalid_start_within"),
                       ({"start_within_s": -3}, "invalid_start_within"), ({"priority": 1}, "invalid_request")]:
        response = requests.post(f"{api_url}/v1/jobs", headers=auth, timeout=10,
                                 json={"task": "describe", "images": ["bar_chart.png"], **body})
        assert (response.status_code, response.json()["error"]["code"]) == (422, code), body
