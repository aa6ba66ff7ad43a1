"""One delivery attempt (worker/webhooks.py) against a real receiver: signed, through the SSRF guard, redirects
not followed, and every way it can end logged and settled."""

from __future__ import annotations

import pytest
from standardwebhooks import Webhook

from shared.jobs import JobFailure, WebhookSpec
from shared.outbound.netguard import guarded_client
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.keys import job_key
from shared.webhooks.sender import Sender
from shared.webhooks.store import WebhookStore
from shared.webhooks.targets import webhook_guard
from tests.jobs import UNCONSUMED_QUEUE, make_job
from tests.webhook_receiver import ScriptedReceiver

HOOK_QUEUE = "unit-tests-sender-webhooks"  # no delivery worker reads it


@pytest.fixture
def receiver():
    with ScriptedReceiver() as running:
        yield running


def make_sender(settings, **changes) -> Sender:
    settings = settings.model_copy(update={"webhook_allow_http": True, "webhook_allowed_networks": ["127.0.0.0/8"],
                                           "webhook_timeout_s": 2.0, **changes})
    client = connect(settings)
    return Sender(settings, JobStore(client, settings.result_ttl_s, webhook_queue=HOOK_QUEUE),
                  WebhookStore(client, HOOK_QUEUE), guarded_client(webhook_guard(settings)))


def ended_job(sender: Sender, url: str, owner: str = "sender-tests") -> str:
    job = make_job().model_copy(update={"owner": owner, "webhook": WebhookSpec(url=url)})
    sender.jobs.create(job, UNCONSUMED_QUEUE)
    sender.jobs.mark_failed(job.id, JobFailure(code="inference_failed", message="boom"))
    return job.id


def test_an_attempt_posts_the_signed_event_once(settings, receiver):
    sender = make_sender(settings)
    job_id = ended_job(sender, receiver.url)
    assert sender.deliver(job_id, "job") == "delivered"
    assert sender.deliver(job_id, "job") is None  # delivered: nothing more to do
    (request,) = receiver.received
    event = Webhook(sender.hooks.job_secret("sender-tests")).verify(request.body, request.headers)
    assert event["data"] == sender.jobs.get(job_id).public() and event["type"] == "job.failed"


def test_a_redirect_is_an_answer_not_followed_and_not_retried(settings, receiver):
    sender = make_sender(settings)
    receiver.fail(302, headers={"Location": receiver.url + "elsewhere"})
    job_id = ended_job(sender, receiver.url)
    assert sender.deliver(job_id, "job") == "failed"
    assert [r.answered for r in receiver.received] == [302]
    assert sender.hooks.deliveries(job_id)[0].attempts[0].error == "HTTP 302"


def test_the_guard_refuses_at_send_time_too(settings, receiver):
    """A URL accepted at submit may not be reachable when sent (settings changed, DNS now points inside)."""
    job_id = ended_job(make_sender(settings), receiver.url)
    strict = make_sender(settings, webhook_allowed_networks=[])
    assert strict.deliver(job_id, "job") == "failed"
    assert receiver.received == []
    assert "refused by the URL guard" in strict.hooks.deliveries(job_id)[0].attempts[0].error


def test_a_job_expired_before_its_first_attempt_fails_its_delivery(settings, receiver):
    sender = make_sender(settings)
    job_id = ended_job(sender, receiver.url)
    sender.jobs.redis.delete(job_key(job_id))
    assert sender.deliver(job_id, "job") == "failed"
    assert receiver.received == []


def test_a_deleted_endpoint_gets_nothing(settings, receiver):
    sender = make_sender(settings)
    endpoint = sender.hooks.add_endpoint("sender-tests-ep", receiver.url, ["job.failed"], None, 5)
    job = make_job().model_copy(update={"owner": "sender-tests-ep"})
    sender.jobs.create(job, UNCONSUMED_QUEUE)
    sender.jobs.mark_failed(job.id, JobFailure(code="x", message="y"))
    sender.hooks.delete_endpoint("sender-tests-ep", endpoint.id)
    assert sender.deliver(job.id, endpoint.id) == "failed"
    assert sender.hooks.deliveries(job.id)[0].attempts[0].error == "the endpoint was deleted"
    assert receiver.received == []
