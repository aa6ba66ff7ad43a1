"""GET /v1/jobs/<id> answered below Flask (api/fast_poll.py) answers exactly as the Flask view does: the same
status, headers and bytes for every outcome, counted under the same metrics series; anything else goes to Flask."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from werkzeug.test import Client

from api import create_app
from api.fast_poll import FastPoll
from shared.jobs import Job, JobResult, JobStatus, Timings, TokenCounts, new_job_id, utcnow
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from shared.store.jobs import JobStore

QUEUE = "visionq-fast-poll-test"  # consumed by no worker: its jobs stay queued


@pytest.fixture
def api_settings(settings):
    return settings.model_copy(update={"auth_enabled": True, "key_cache_s": 0})


@pytest.fixture
def paths(api_settings):
    """(through the fast path, through Flask alone): two apps, so that neither warms the other's caches."""
    fast, slow = create_app(api_settings), create_app(api_settings)
    assert isinstance(fast.wsgi_app, FastPoll)
    return Client(fast.wsgi_app), Client(slow.wsgi_app.flask_wsgi)


def new_job(store: JobStore, owner: str) -> Job:
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, task="describe", images=["a.png"], image_count=1,
              question="q", max_new_tokens=8, created_at=utcnow(), owner=owner)
    store.create(job, QUEUE)
    return job


def succeed(store: JobStore, job: Job) -> None:
    store.mark_running(job.id, "test-worker")
    store.mark_succeeded(job.id, JobResult(text="out", model="m", tokens=TokenCounts(prompt=1, completion=1),
                                           timings=Timings(queue_ms=0, images_ms=0, inference_ms=0)))


def answer(client: Client, path: str, headers: dict | None = None, method: str = "GET") -> tuple:
    response = client.open(path, method=method, headers=headers or {})
    return response.status_code, dict(response.headers), response.get_data()


def same(fast: Client, slow: Client, path: str, headers: dict | None = None) -> tuple:
    fast_answer, slow_answer = answer(fast, path, headers), answer(slow, path, headers)
    assert fast_answer == slow_answer
    return fast_answer


def test_every_outcome_of_a_poll_is_answered_as_flask_answers_it(paths, api_settings):
    fast, slow = paths
    keys, store = KeyStore(connect(api_settings)), JobStore.from_settings(connect(api_settings), api_settings)
    secret, key = keys.create("fast-poll")
    other_secret, other = keys.create("other")
    bearer = {"Authorization": f"Bearer {secret}"}
    new_job(store, other.id)  # ahead in the queue: the queued job's place is computed over both keys
    queued, running, finished = new_job(store, key.id), new_job(store, key.id), new_job(store, key.id)
    store.mark_running(running.id, "test-worker")
    succeed(store, finished)

    status, headers, body = same(fast, slow, f"/v1/jobs/{queued.id}", bearer)
    assert status == 200 and headers["Content-Type"] == "application/json" and b'"queue":{"position":' in body
    assert same(fast, slow, f"/v1/jobs/{running.id}", bearer)[0] == 200
    for _ in range(2):  # the second from each app's finished-job cache
        assert b'"status":"succeeded"' in same(fast, slow, f"/v1/jobs/{finished.id}", bearer)[2]
    assert same(fast, slow, f"/v1/jobs/{queued.id}", {"Authorization": f"Bearer {other_secret}"})[0] == 404
    assert same(fast, slow, f"/v1/jobs/{finished.id}", {"Authorization": f"Bearer {other_secret}"})[0] == 404
    assert same(fast, slow, "/v1/jobs/no-such-job", bearer)[0] == 404
    for refused in ({}, {"Authorization": f"Basic {secret}"}, {"Authorization": "Bearer vq_unknown"}):
        status, _, body = same(fast, slow, f"/v1/jobs/{queued.id}", refused)
        assert status == 401 and body.startswith(b'{"error":{"code":"unauthorized"')


def test_a_key_over_its_rate_is_refused_alike(paths, api_settings):
    fast, slow = paths
    keys, store = KeyStore(connect(api_settings)), JobStore.from_settings(connect(api_settings), api_settings)
    answers = []
    for client in (fast, slow):  # a key each: each path drains its own bucket
        secret, key = keys.create("one-a-minute", rate_per_s=1 / 60, burst=1)
        job = new_job(store, key.id)
        first, second = (answer(client, f"/v1/jobs/{job.id}", {"Authorization": f"Bearer {secret}"})
                         for _ in range(2))
        assert first[0] == 200
        answers.append(second)
    assert answers[0] == answers[1]
    assert answers[0][0] == 429 and int(answers[0][1]["Retry-After"]) >= 1


def test_a_store_out_of_reach_is_answered_alike(api_settings):
    down = api_settings.model_copy(update={"redis_url": "redis://127.0.0.1:9"})
    fast, slow = Client(create_app(down).wsgi_app), Client(create_app(down).wsgi_app.flask_wsgi)
    status, _, body = same(fast, slow, "/v1/jobs/any", {"Authorization": "Bearer vq_x"})
    assert status == 503 and b'"store_unavailable"' in body


def counted(route: str, status: str) -> float:
    return REGISTRY.get_sample_value("visionq_api_requests_total",
                                     {"method": "GET", "route": route, "status": status}) or 0.0


def test_polls_are_counted_under_the_routes_series_and_other_requests_reach_flask(paths, api_settings):
    fast, _ = paths
    secret, key = KeyStore(connect(api_settings)).create("fast-poll-metrics")
    job = new_job(JobStore.from_settings(connect(api_settings), api_settings), key.id)
    bearer = {"Authorization": f"Bearer {secret}"}
    before = {status: counted("/v1/jobs/<job_id>", status) for status in ("200", "404")}
    timed = REGISTRY.get_sample_value("visionq_api_request_seconds_count",
                                      {"method": "GET", "route": "/v1/jobs/<job_id>"}) or 0.0
    assert answer(fast, f"/v1/jobs/{job.id}", bearer)[0] == 200
    assert answer(fast, "/v1/jobs/no-such-job", bearer)[0] == 404
    assert counted("/v1/jobs/<job_id>", "200") == before["200"] + 1
    assert counted("/v1/jobs/<job_id>", "404") == before["404"] + 1
    assert REGISTRY.get_sample_value("visionq_api_request_seconds_count",
                                     {"method": "GET", "route": "/v1/jobs/<job_id>"}) == timed + 2
    # Flask's own answers: a query string, HEAD, the collection, a sub-resource with GET (a POST route).
    assert answer(fast, f"/v1/jobs/{job.id}?wait=0", bearer)[0] == 200
    assert counted("/v1/jobs/<job_id>", "200") == before["200"] + 2  # Flask counts it under the same series
    assert answer(fast, f"/v1/jobs/{job.id}", bearer, method="HEAD")[0] == 200
    assert answer(fast, "/v1/jobs", bearer)[0] == 200
    assert answer(fast, f"/v1/jobs/{job.id}/cancel", bearer)[0] == 405
    assert answer(fast, f"/v1/jobs/{job.id}?wait=x", bearer)[0] == 400
