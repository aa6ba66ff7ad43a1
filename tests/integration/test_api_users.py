"""The API for real users, over HTTP against the live stack: keys, isolation, idempotency, cancel, listing,
rate limits and quotas, readiness."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from cli.client import ApiError
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from shared.store.workers import WorkerRegistry
from tests.conftest import PARKED_MODEL

IMAGE = ["bar_chart.png"]


def error_code(call) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.status, info.value.code


# --- keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer vq_not-a-key", "Basic dXNlcjpwYXNz", "vq_token-alone"])
def test_missing_or_wrong_key_is_401(api_url, header):
    headers = {"Authorization": header} if header else {}
    for response in (requests.post(f"{api_url}/v1/jobs", json={"task": "describe", "images": IMAGE},
                                   headers=headers, timeout=5),
                     requests.get(f"{api_url}/v1/jobs", headers=headers, timeout=5),
                     requests.get(f"{api_url}/v1/jobs/abc", headers=headers, timeout=5)):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_a_revoked_key_stops_working(make_client, settings):
    client = make_client()
    client.submit("describe", IMAGE, max_new_tokens=1)
    assert KeyStore(connect(settings)).revoke(client.key_id)
    assert error_code(lambda: client.list()) == (401, "unauthorized")
    assert not KeyStore(connect(settings)).revoke("no-such-id")


def test_only_the_hash_of_a_key_is_stored(settings):
    secret, key = KeyStore(connect(settings)).create("hash-check")
    redis = connect(settings, decode_responses=False)  # bytes: other tests store binary values (uploads)
    needle = secret.encode()
    stored = {b"hash": redis.hvals, b"string": lambda k: [redis.get(k)]}
    for name in redis.scan_iter(b"visionq:*"):
        assert needle not in name
        assert all(needle not in value for value in stored.get(redis.type(name), lambda k: [])(name))
    assert KeyStore(connect(settings)).lookup(secret) == key


# --- isolation --------------------------------------------------------------------------------------------


def test_another_keys_job_answers_exactly_as_an_unknown_id(make_client):
    alice, bob = make_client(), make_client()
    job = alice.submit("describe", IMAGE, max_new_tokens=200)
    started = time.monotonic()
    assert error_code(lambda: bob.get(job["id"])) == (404, "not_found")
    assert error_code(lambda: bob.get(job["id"], wait_s=5)) == (404, "not_found")
    assert time.monotonic() - started < 2  # no waiting on someone else's job
    assert error_code(lambda: bob.cancel(job["id"])) == (404, "not_found")
    assert error_code(lambda: bob.get("no-such-job")) == (404, "not_found")
    assert job["id"] not in [j["id"] for j in bob.list(limit=100)["jobs"]]
    assert alice.wait(job["id"], 60)["status"] == "succeeded"


# --- idempotency ------------------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_same_job(make_client):
    client = make_client()
    first = client.submit("describe", IMAGE, max_new_tokens=2, idempotency_key="order-1")
    again = client.submit("describe", IMAGE, max_new_tokens=2, idempotency_key="order-1")
    assert again["id"] == first["id"]
    assert [j["id"] for j in client.list(limit=100)["jobs"]] == [first["id"]]


def test_the_same_idempotency_key_with_another_body_is_a_conflict(make_client):
    client = make_client()
    client.submit("describe", IMAGE, max_new_tokens=2, idempotency_key="order-2")
    conflict = lambda: client.submit("describe", IMAGE, max_new_tokens=3, idempotency_key="order-2")  # noqa: E731
    assert error_code(conflict) == (422, "idempotency_conflict")


def test_concurrent_identical_requests_create_one_job(make_client):
    client = make_client()
    barrier, ids = threading.Barrier(12), []

    def submit():
        barrier.wait()
        ids.append(client.submit("ocr", ["book_cover.png"], max_new_tokens=2, idempotency_key="burst")["id"])

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 12 and len(set(ids)) == 1
    assert [j["id"] for j in client.list(limit=100)["jobs"]] == ids[:1]
    assert client.wait(ids[0], 60)["attempts"] == 1  # queued once, run once


# --- cancel -----------------------------------------------------------------------------------------------


def test_cancel_a_queued_job_means_it_never_runs(make_client, store):
    client = make_client()
    # A model the API accepts and no worker serves: the job stays queued (a busy worker would take it at once,
    # since a batching worker holds many jobs).
    queued = client.submit("describe", ["no_such_file.png"], max_new_tokens=4, model=PARKED_MODEL)
    assert client.get(queued["id"])["status"] == "queued"
    canceled = client.cancel(queued["id"])
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "canceled"
    skipped = client.get(queued["id"])
    assert skipped["status"] == "canceled" and skipped["attempts"] == 0 and "started_at" not in skipped


def test_cancel_a_running_job_stops_its_generation(make_client, stack, settings):
    from shared.store.jobs import JobStore

    client, store = make_client(), JobStore(connect(settings), settings.result_ttl_s)

    def jobs_counted() -> int:  # the worker counts a job after storing its result: absent before its first
        return WorkerRegistry(store.redis).info(stack.worker_name).get("jobs", 0)

    counted = jobs_counted()
    full = client.wait(client.submit("describe", IMAGE, max_new_tokens=1024)["id"], 120)
    full_s = full["result"]["timings"]["inference_ms"] / 1000
    while jobs_counted() == counted:  # the full job counted, so that the count below moves only for the next
        time.sleep(0.01)
    job = client.submit("describe", IMAGE, max_new_tokens=1024)
    while client.get(job["id"])["status"] != "running":
        time.sleep(0.01)
    jobs_before = jobs_counted()
    canceled_at = time.monotonic()
    assert client.cancel(job["id"])["status"] == "canceled"
    while jobs_counted() == jobs_before:  # the runner is done with it
        time.sleep(0.01)
    assert time.monotonic() - canceled_at < full_s / 2, "generation ran on after the cancel"
    ended = client.get(job["id"])
    assert ended["status"] == "canceled" and "result" not in ended


def test_cancel_a_finished_job_is_409(make_client):
    client = make_client()
    job = client.wait(client.submit("describe", IMAGE, max_new_tokens=1)["id"], 60)
    assert error_code(lambda: client.cancel(job["id"])) == (409, "already_finished")
    with pytest.raises(ApiError, match="the job has already ended: succeeded"):
        client.cancel(job["id"])
    parked = client.submit("describe", IMAGE, model=PARKED_MODEL)  # served by no worker: still queued
    client.cancel(parked["id"])
    with pytest.raises(ApiError, match="the job has already been canceled"):
        client.cancel(parked["id"])
    with pytest.raises(ApiError, match="this task takes exactly 1 image, got 2"):
        client.submit("describe", IMAGE * 2)


# --- listing ----------------------------------------------------------------------------------------------


def test_listing_is_newest_first_and_paginated(make_client):
    client = make_client()
    submitted = [client.submit("describe", IMAGE, max_new_tokens=1)["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = client.list(limit=2, cursor=cursor)
        assert len(page["jobs"]) <= 2
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == submitted[::-1]


def test_listing_filters_by_status(make_client):
    client = make_client()
    done = client.wait(client.submit("describe", IMAGE, max_new_tokens=1)["id"], 60)["id"]
    failed = client.wait(client.submit("describe", ["no_such_file.png"])["id"], 60)["id"]
    assert [j["id"] for j in client.list(status="failed")["jobs"]] == [failed]
    assert [j["id"] for j in client.list(status="succeeded")["jobs"]] == [done]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "status=lost", "cursor=%%%"])
def test_listing_rejects_bad_parameters(api_url, auth, query):
    response = requests.get(f"{api_url}/v1/jobs?{query}", headers=auth, timeout=5)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parameter"


# --- rate limits and quotas -------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(make_client):
    client = make_client(rate_per_s=0.5, burst=2)
    statuses = [client.http.get(f"{client.base_url}/v1/jobs", timeout=5) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].json()["error"]["code"] == "rate_limited"
    assert int(statuses[2].headers["Retry-After"]) >= 1


def test_every_endpoint_is_rate_limited(make_client):
    client = make_client(rate_per_s=0.01, burst=1)
    job = client.submit("describe", IMAGE, max_new_tokens=1)  # spends the only token
    calls = {
        "submit": lambda: client.http.post(f"{client.base_url}/v1/jobs", json={"task": "describe", "images": IMAGE}),
        "invalid submit": lambda: client.http.post(f"{client.base_url}/v1/jobs", json={"task": "nope"}),
        "get": lambda: client.http.get(f"{client.base_url}/v1/jobs/{job['id']}"),
        "list": lambda: client.http.get(f"{client.base_url}/v1/jobs"),
        "cancel": lambda: client.http.post(f"{client.base_url}/v1/jobs/{job['id']}/cancel"),
    }
    for name, call in calls.items():
        response = call()
        assert response.status_code == 429, name
        assert response.json()["error"]["code"] == "rate_limited" and int(response.headers["Retry-After"]) >= 1


def test_jobs_queued_per_key_are_bounded(make_client):
    client = make_client(max_active_jobs=1)
    first = client.submit("describe", IMAGE, max_new_tokens=1024)
    assert error_code(lambda: client.submit("describe", IMAGE, max_new_tokens=1)) == (429, "queue_full")
    client.cancel(first["id"])  # its slot is free again
    assert client.wait(client.submit("describe", IMAGE, max_new_tokens=1)["id"], 60)["status"] == "succeeded"


# --- health -----------------------------------------------------------------------------------------------


def test_health_and_readiness(api_url, stack):
    assert requests.get(f"{api_url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{api_url}/readyz", timeout=5)
    assert ready.status_code == 200 and stack.worker_name in ready.json()["workers"]


# --- the server -------------------------------------------------------------------------------------------


def test_an_idle_connection_outlives_gunicorns_default_keep_alive(api_url):
    """gunicorn's own default (2 s) resets a connection a client (or a load balancer) reuses after it; the API
    keeps idle connections API_KEEPALIVE_S (75 s), so the same socket still answers after 3 s."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(api_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    first = connection.sock
    time.sleep(3)  # the idle time itself is what is tested
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200
    assert connection.sock is first  # no reconnect was needed
    connection.close()


def test_a_connection_is_closed_after_api_keepalive_requests_and_the_client_reconnects(api_url, settings):
    """A gunicorn process keeps each connection it accepts: a bounded number of requests per connection (1000)
    lets the kernel deal a client's pool over the processes again."""
    import http.client
    from urllib.parse import urlsplit

    limit = settings.api_keepalive_requests
    address = urlsplit(api_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    sockets, closes = [], []
    for _ in range(limit + 1):
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        sockets.append(connection.sock)
        closes.append(response.getheader("Connection"))
    connection.close()
    assert closes[:limit - 1] == ["keep-alive"] * (limit - 1)
    assert closes[limit - 1] == "close" and sockets[limit - 1] is None  # http.client dropped the closed socket
    assert closes[limit] == "keep-alive"  # the next request went over a new connection
