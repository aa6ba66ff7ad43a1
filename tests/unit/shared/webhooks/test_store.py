"""The webhook outbox and its schedule in Redis: the event is written by the terminal transition itself, once;
a delivery is held by one attempt at a time; retries wait their turn and stop at the give-up horizon."""

from __future__ import annotations

import json
import time

import pytest

from shared.jobs import JobFailure, JobStatus, WebhookSpec
from shared.store.broker import DISPATCH_WEBHOOKS_TASK
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.keys import deliveries_key
from shared.webhooks.endpoints import attempt_entry
from shared.webhooks.store import WebhookStore
from tests.jobs import UNCONSUMED_QUEUE, make_job

HOOK_QUEUE = "unit-tests-webhooks"  # no delivery worker reads it


@pytest.fixture
def stores(settings):
    client = connect(settings)
    jobs = JobStore(client, settings.result_ttl_s, webhook_queue=HOOK_QUEUE)
    hooks = WebhookStore(client, HOOK_QUEUE)
    client.delete(HOOK_QUEUE, hooks.due_key)
    return jobs, hooks


def queued_tasks(hooks: WebhookStore) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in hooks.redis.lrange(hooks.queue, 0, -1)]


def job_with_webhook(jobs: JobStore, owner: str = "owner-a", events: list[str] | None = None, **changes):
    job = make_job().model_copy(update={"owner": owner, "webhook": WebhookSpec(url="https://example.com/hook",
                                                                               events=events), **changes})
    jobs.create(job, UNCONSUMED_QUEUE)
    return job


def test_the_end_of_a_job_writes_one_event_and_queues_one_dispatch(stores):
    jobs, hooks = stores
    job = job_with_webhook(jobs)
    jobs.mark_running(job.id, "w1")
    assert hooks.deliveries(job.id) == []  # only an end makes an event
    jobs.mark_failed(job.id, JobFailure(code="inference_failed", message="boom"))
    (delivery,) = hooks.deliveries(job.id)
    assert (delivery.id, delivery.event_id, delivery.type) == ("job", f"msg_{job.id}", "job.failed")
    assert delivery.status == "pending" and delivery.url == "https://example.com/hook"
    assert queued_tasks(hooks) == [DISPATCH_WEBHOOKS_TASK]
    assert hooks.take_due(lease_s=30) == [(job.id, "job")]


def test_a_repeated_end_writes_no_second_event(stores):
    """A redelivered task that ends the job again (or a cancel racing it) is refused by the compare-and-set,
    and so writes nothing to the outbox."""
    jobs, hooks = stores
    job = job_with_webhook(jobs)
    jobs.mark_canceled(job.id, JobFailure(code="canceled", message="by client"))
    assert not jobs.mark_failed(job.id, JobFailure(code="worker_lost", message="again")).applied
    assert not jobs.mark_canceled(job.id, JobFailure(code="canceled", message="again")).applied
    assert hooks.redis.lrange(deliveries_key(job.id), 0, -1) == ["job"]
    assert len(queued_tasks(hooks)) == 1
    assert [d.type for d in hooks.deliveries(job.id)] == ["job.canceled"]


def test_registered_endpoints_get_the_events_they_asked_for(stores):
    jobs, hooks = stores
    owner = f"owner-{time.time_ns()}"
    every = hooks.add_endpoint(owner, "https://a.example/", ["job.succeeded", "job.failed", "job.canceled"], None, 5)
    hooks.add_endpoint(owner, "https://b.example/", ["job.succeeded"], None, 5)  # not this event
    job = job_with_webhook(jobs, owner=owner, events=["job.succeeded"])  # the job's own hook does not want it
    jobs.mark_failed(job.id, JobFailure(code="x", message="y"))
    assert [(d.id, d.url, d.endpoint_id) for d in hooks.deliveries(job.id)] == [(every.id, every.url, every.id)]


def test_a_job_without_webhooks_leaves_nothing_to_send(stores):
    jobs, hooks = stores
    job = make_job()
    jobs.create(job, UNCONSUMED_QUEUE)
    jobs.mark_failed(job.id, JobFailure(code="x", message="y"))
    assert hooks.deliveries(job.id) == [] and queued_tasks(hooks) == []


def test_endpoints_are_bounded_per_key_and_secrets_are_standard(stores):
    _, hooks = stores
    owner = f"owner-{time.time_ns()}"
    first = hooks.add_endpoint(owner, "https://a.example/", ["job.failed"], "mine", 1)
    assert first.secret.startswith("whsec_") and first.id.startswith("ep_")
    assert hooks.add_endpoint(owner, "https://b.example/", ["job.failed"], None, 1) is None
    assert hooks.delete_endpoint(owner, first.id) and not hooks.delete_endpoint(owner, first.id)
    assert hooks.job_secret(owner) == hooks.job_secret(owner)  # made once, then kept


def ended_job(stores) -> str:
    jobs, hooks = stores
    job = job_with_webhook(jobs)
    jobs.mark_failed(job.id, JobFailure(code="x", message="y"))
    return job.id


def test_one_attempt_at_a_time_holds_a_delivery(stores):
    _, hooks = stores
    job_id = ended_job(stores)
    claim = hooks.claim(job_id, "job", lease_s=30)
    assert claim.attempt == 1 and claim.fields["event_id"] == f"msg_{job_id}"
    assert hooks.claim(job_id, "job", lease_s=30) is None  # held
    assert hooks.take_due(lease_s=30) == []  # and not due again until the lease ends
    assert hooks.record(claim, attempt_entry(1, 200, 5.0, None), "delivered", 0, 3600, 10) == "delivered"
    assert hooks.claim(job_id, "job", lease_s=30) is None  # delivered: never sent again by itself
    (delivery,) = hooks.deliveries(job_id)
    assert delivery.status == "delivered" and [a.status_code for a in delivery.attempts] == [200]


def test_an_attempt_whose_worker_died_is_made_again_when_its_lease_ends(stores):
    _, hooks = stores
    job_id = ended_job(stores)
    first = hooks.claim(job_id, "job", lease_s=0.2)
    time.sleep(0.3)  # the attempt's worker is gone: nothing records it
    assert hooks.take_due(lease_s=30) == [(job_id, "job")]
    second = hooks.claim(job_id, "job", lease_s=30)
    assert second.attempt == 2
    # The dead attempt's record, should it come after all, is logged but settles nothing.
    assert hooks.record(first, attempt_entry(1, 500, 1.0, "HTTP 500"), "retry", 0, 3600, 10) == "stale"
    assert hooks.record(second, attempt_entry(2, 204, 1.0, None), "delivered", 0, 3600, 10) == "delivered"
    assert hooks.deliveries(job_id)[0].status == "delivered"


def test_a_retry_waits_for_its_time_and_gives_up_past_the_horizon(stores):
    _, hooks = stores
    job_id = ended_job(stores)
    claim = hooks.claim(job_id, "job", lease_s=30)
    assert hooks.record(claim, attempt_entry(1, 503, 1.0, "HTTP 503"), "retry", 0.3, 3600, 10) == "retry"
    assert hooks.claim(job_id, "job", lease_s=30) is None  # not yet
    assert hooks.deliveries(job_id)[0].next_attempt_at is not None
    time.sleep(0.35)
    claim = hooks.claim(job_id, "job", lease_s=30)
    assert claim.attempt == 2
    assert hooks.record(claim, attempt_entry(2, 503, 1.0, "HTTP 503"), "retry", 60, 30, 10) == "failed"
    (delivery,) = hooks.deliveries(job_id)
    assert delivery.status == "failed" and [a.outcome for a in delivery.attempts] == ["retry", "failed"]
    assert hooks.take_due(lease_s=30) == []


def test_a_manual_retry_sends_the_same_event_again(stores):
    _, hooks = stores
    job_id = ended_job(stores)
    claim = hooks.claim(job_id, "job", lease_s=30)
    assert hooks.retry(job_id, "job", 60) == "busy"  # an attempt is under way
    hooks.record(claim, attempt_entry(1, 400, 1.0, "HTTP 400"), "failed", 0, 3600, 10)
    hooks.redis.delete(hooks.queue)
    assert hooks.retry(job_id, "job", 60) == "ok"
    assert queued_tasks(hooks) == [DISPATCH_WEBHOOKS_TASK]
    again = hooks.claim(job_id, "job", lease_s=30)
    assert again.attempt == 2 and again.fields["event_id"] == f"msg_{job_id}"
    assert again.fields["schedule_base"] == "1"  # the sender's backoff counts from here again
    assert hooks.retry(job_id, "nope", 60) == "missing"


def test_the_attempt_log_keeps_only_the_latest(stores):
    _, hooks = stores
    job_id = ended_job(stores)
    for attempt in range(1, 5):
        claim = hooks.claim(job_id, "job", lease_s=30)
        hooks.record(claim, attempt_entry(attempt, 500, 1.0, "HTTP 500"), "retry", 0, 3600, 2)
    assert [a.attempt for a in hooks.deliveries(job_id)[0].attempts] == [3, 4]


def test_the_job_hash_keeps_the_webhook(stores):
    jobs, _ = stores
    job = job_with_webhook(jobs, events=["job.failed"])
    assert jobs.get(job.id).webhook == job.webhook
    assert jobs.get(job.id).status == JobStatus.QUEUED
