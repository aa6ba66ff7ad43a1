"""Webhooks end to end: the API, the GPU worker and the delivery worker (real processes) against a real HTTP
receiver on 127.0.0.1 that fails, answers slowly, holds requests or is down on cue."""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest
from standardwebhooks import Webhook

from cli.client import ApiError, Client
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from tests.conftest import settings_env
from tests.webhook_receiver import ScriptedReceiver

# Loopback receivers allowed, by the webhook allowances only (the defaults refuse them: see the last tests);
# retries fast; give up after 5 s.
HOOK_ENV = {"VISIONQ_ALLOW_HTTP": "false", "VISIONQ_URL_ALLOWED_NETWORKS": "[]",  # the README's recipe
            "VISIONQ_WEBHOOK_ALLOW_HTTP": "true", "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "VISIONQ_WEBHOOK_TIMEOUT_S": "1", "VISIONQ_WEBHOOK_RETRY_BASE_S": "0.2",
            "VISIONQ_WEBHOOK_RETRY_MAX_S": "0.3", "VISIONQ_WEBHOOK_GIVE_UP_S": "5", "VISIONQ_WEBHOOK_POLL_S": "0.1"}
DEFAULT_GUARD_ENV = {"VISIONQ_ALLOW_HTTP": "false", "VISIONQ_URL_ALLOWED_NETWORKS": "[]",
                     "VISIONQ_WEBHOOK_ALLOW_HTTP": "false", "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": "[]"}
IMAGE = ["bar_chart.png"]


@pytest.fixture(scope="module")
def hook_stack(stack, settings, tmp_path_factory):
    """An API and the delivery worker with the settings above, on the session stack's queue: its GPU worker
    runs the jobs (the session stack starts no delivery worker of its own)."""
    env = {**settings_env(settings), **HOOK_ENV}
    with Stack(settings, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("hook-logs"),
               worker=False, batches=False) as hooked:
        yield hooked


@pytest.fixture(scope="module")
def default_guard_api(settings, tmp_path_factory):
    """An API whose SSRF guard has its default settings, whatever the other stacks allow."""
    env = {**settings_env(settings), **DEFAULT_GUARD_ENV}
    with Stack(settings, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("guard-logs"),
               worker=False, webhooks=False, batches=False) as api:
        yield Client(api.api_url, key=api.api_key, timeout_s=30)


def client_with_new_key(stack: Stack, settings) -> Client:
    secret, _ = KeyStore(connect(settings)).create("webhooks")
    return Client(stack.api_url, key=secret, timeout_s=30)


@pytest.fixture
def hook_client(hook_stack, settings) -> Client:
    """A client with an API key of its own (so endpoints and secrets of one test never reach another)."""
    return client_with_new_key(hook_stack, settings)


@pytest.fixture
def receiver():
    with ScriptedReceiver() as running:
        yield running


def canceled_job(client: Client, url: str | None = None) -> dict:
    """A job ended by the API (cancel): the terminal transition that runs in the API process."""
    job = client.submit("describe", IMAGE, max_new_tokens=1024, webhook={"url": url} if url else None)
    client.cancel(job["id"])
    return job


def wait_for_delivery(client: Client, job_id: str, status: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        deliveries = client.deliveries(job_id)
        if deliveries and deliveries[0]["status"] == status:
            return deliveries[0]
        assert time.monotonic() < deadline, f"delivery never became {status}: {deliveries}"
        time.sleep(0.05)


def test_a_finished_job_sends_one_signed_event_with_the_job(hook_client, receiver):
    job = hook_client.submit("ocr", IMAGE, max_new_tokens=4, webhook={"url": receiver.url})
    done = hook_client.wait(job["id"], timeout_s=60)
    assert done["status"] == "succeeded"
    (request,) = receiver.wait_for(1)
    event = Webhook(hook_client.webhook_secret()).verify(request.body, request.headers)
    assert event == {"type": "job.succeeded", "timestamp": done["finished_at"], "data": done}
    assert request.webhook_id == f"msg_{job['id']}"
    delivery = wait_for_delivery(hook_client, job["id"], "delivered")
    assert delivery["event_id"] == request.webhook_id and delivery["url"] == receiver.url
    (attempt,) = delivery["attempts"]
    assert attempt["status_code"] == 204 and attempt["latency_ms"] > 0 and "error" not in attempt


def test_a_registered_endpoint_gets_its_events_signed_with_its_own_secret(hook_client, receiver):
    endpoint = hook_client.add_webhook(receiver.url, events=["job.canceled"])
    assert endpoint["secret"].startswith("whsec_")
    assert [e["id"] for e in hook_client.webhooks()] == [endpoint["id"]]
    assert "secret" not in hook_client.webhooks()[0]  # shown once
    job = canceled_job(hook_client)
    (request,) = receiver.wait_for(1)
    event = Webhook(endpoint["secret"]).verify(request.body, request.headers)
    assert event["type"] == "job.canceled" and event["data"]["error"]["code"] == "canceled"
    delivery = wait_for_delivery(hook_client, job["id"], "delivered")
    assert delivery["id"] == delivery["endpoint_id"] == endpoint["id"]
    hook_client.delete_webhook(endpoint["id"])
    assert hook_client.webhooks() == []


def test_another_key_sees_neither_the_deliveries_nor_the_endpoints(hook_stack, hook_client, receiver, settings):
    job = canceled_job(hook_client, receiver.url)
    wait_for_delivery(hook_client, job["id"], "delivered")
    hook_client.add_webhook(receiver.url)
    other = client_with_new_key(hook_stack, settings)
    for call in (lambda: other.deliveries(job["id"]), lambda: other.retry_delivery(job["id"], "job")):
        with pytest.raises(ApiError) as hidden:
            call()
        assert hidden.value.status == 404
    assert other.webhooks() == []
    assert other.webhook_secret() != hook_client.webhook_secret()


def test_failures_then_success_keep_one_webhook_id_and_honour_retry_after(hook_client, receiver):
    receiver.fail(500, 503).fail(429, headers={"Retry-After": "1"})
    job = canceled_job(hook_client, receiver.url)
    delivery = wait_for_delivery(hook_client, job["id"], "delivered")
    requests = receiver.received
    assert {r.webhook_id for r in requests} == {f"msg_{job['id']}"}
    assert [r.answered for r in requests] == [500, 503, 429, 204]
    waits = [later.at - earlier.at for earlier, later in zip(requests, requests[1:], strict=False)]
    assert waits[2] >= 1  # Retry-After: 1 was honoured (the backoff here waits at most 0.3 s)
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 429, 204]
    assert [a["outcome"] for a in delivery["attempts"]] == ["retry", "retry", "retry", "delivered"]


def test_a_receiver_down_for_a_while_gets_the_event_once_it_is_up(hook_client):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    job = canceled_job(hook_client, url)  # nothing listens there yet
    deadline = time.monotonic() + 10
    while len(hook_client.deliveries(job["id"])[0]["attempts"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with ScriptedReceiver(port) as receiver:
        wait_for_delivery(hook_client, job["id"], "delivered")
        assert [r.webhook_id for r in receiver.received] == [f"msg_{job['id']}"]  # once
    attempts = hook_client.deliveries(job["id"])[0]["attempts"]
    assert "status_code" not in attempts[0] and "ConnectError" in attempts[0]["error"]


def test_a_400_is_not_retried(hook_client, receiver):
    receiver.fail(400)
    job = canceled_job(hook_client, receiver.url)
    delivery = wait_for_delivery(hook_client, job["id"], "failed")
    assert [(a["status_code"], a["outcome"]) for a in delivery["attempts"]] == [(400, "failed")]
    assert len(receiver.received) == 1


def test_a_slow_receiver_times_out_and_gets_the_same_event_again(hook_client, receiver):
    receiver.fail(204, delay_s=2.5)  # answers after the 1 s timeout
    job = canceled_job(hook_client, receiver.url)
    delivery = wait_for_delivery(hook_client, job["id"], "delivered")
    assert "no answer within 1 s" in delivery["attempts"][0]["error"]
    assert {r.webhook_id for r in receiver.received} == {f"msg_{job['id']}"}
    assert len(receiver.received) >= 2


def test_a_receiver_that_keeps_failing_is_given_up_on(hook_client, receiver):
    receiver.fail(*[503] * 1000)
    job = canceled_job(hook_client, receiver.url)
    delivery = wait_for_delivery(hook_client, job["id"], "failed", timeout_s=20)
    attempts = delivery["attempts"]
    assert [a["outcome"] for a in attempts] == ["retry"] * (len(attempts) - 1) + ["failed"]
    assert all(a["status_code"] == 503 for a in attempts) and len(attempts) >= 3
    spent = datetime.fromisoformat(attempts[-1]["at"]) - datetime.fromisoformat(attempts[0]["at"])
    assert spent.total_seconds() >= 4  # it gave up at the 5 s horizon (less the last backoff), not before
    assert "next_attempt_at" not in delivery


def test_a_manual_retry_sends_the_same_event_again(hook_client, receiver):
    job = canceled_job(hook_client, receiver.url)
    wait_for_delivery(hook_client, job["id"], "delivered")
    retried = hook_client.retry_delivery(job["id"], "job")
    assert retried["status"] == "pending"
    first, again = receiver.wait_for(2)
    assert first.webhook_id == again.webhook_id == f"msg_{job['id']}"
    assert len(wait_for_delivery(hook_client, job["id"], "delivered")["attempts"]) == 2
    with pytest.raises(ApiError) as missing:
        hook_client.retry_delivery(job["id"], "ep_nope")
    assert missing.value.status == 404


def test_the_delivery_worker_killed_mid_delivery_still_delivers_one_event(hook_stack, hook_client, receiver):
    receiver.release.clear()  # hold the first request: the worker is mid-delivery
    job = canceled_job(hook_client, receiver.url)
    receiver.wait_for(1)
    hook_stack.stop_process("webhooks", signal.SIGKILL)
    receiver.release.set()
    hook_stack.start_webhooks()
    hook_stack.wait_for_webhooks(timeout_s=60)
    delivery = wait_for_delivery(hook_client, job["id"], "delivered", timeout_s=60)
    assert {r.webhook_id for r in receiver.received} == {f"msg_{job['id']}"}  # the receiver counts one event
    # The killed attempt recorded nothing; the next one, made when its lease ran out, delivered.
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(2, 204)]


def test_a_webhook_url_the_default_guard_refuses_is_a_400_at_submit(default_guard_api):
    """By default: https only, public addresses only."""
    client = default_guard_api
    for url in ("https://127.0.0.1:9/hook", "http://example.com/hook", "https://10.1.2.3/hook"):
        with pytest.raises(ApiError) as refused:
            client.submit("describe", IMAGE, webhook={"url": url})
        assert (refused.value.status, refused.value.code) == (400, "invalid_webhook_url"), url
    with pytest.raises(ApiError) as refused:
        client.add_webhook("https://127.0.0.1/hook")
    assert (refused.value.status, refused.value.code) == (400, "invalid_webhook_url")


def test_the_development_recipe_leaves_image_urls_to_loopback_refused(hook_client, receiver):
    """The recipe opens loopback to webhooks (every test above delivers to one), and to nothing else."""
    for url, code in ((receiver.url + "a.png", "invalid_image_ref"),
                      (receiver.url.replace("http://", "https://") + "a.png", "image_forbidden_address")):
        with pytest.raises(ApiError) as refused:
            hook_client.submit("describe", [url], webhook={"url": receiver.url})
        assert (refused.value.status, refused.value.code) == (422, code), url
    assert receiver.received == []


def test_unknown_webhook_events_are_refused(hook_client, receiver):
    with pytest.raises(ApiError) as refused:
        hook_client.submit("describe", IMAGE, webhook={"url": receiver.url, "events": ["job.exploded"]})
    assert (refused.value.status, refused.value.code) == (422, "invalid_webhook_events")
    assert receiver.received == []
