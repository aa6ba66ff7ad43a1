"""Batches in Redis with the batch worker's steps run in the test: admission by custom_id exactly once, counts
moved by the job transitions, the end told once, cancel and retry, the key's cap, idempotent requests."""

from __future__ import annotations

import json

import pytest

from shared.batches.batch import BatchStatus
from shared.images.uploads import UploadStore
from shared.jobs import JobFailure
from shared.store.connection import connect
from shared.store.keys import batch_key, batch_lock_key, deliveries_key, delivery_key, job_key, upload_key
from tests.batches import RESULT, lines, make_stores


def told(stores, batch_id: str) -> list[str]:
    """The event types the batch's own webhook was sent, as the outbox wrote them."""
    ids = stores.batches.redis.lrange(deliveries_key(batch_id), 0, -1)
    return [stores.batches.redis.hget(delivery_key(batch_id, delivery), "type") for delivery in ids]


@pytest.fixture
def stores(settings):
    made = make_stores(settings, batch_chunk_items=4)
    made.batches.redis.delete(made.batches.queue, made.batches.due_key)
    return made


def test_a_batch_is_validating_with_its_first_step_queued(stores):
    batch_id = stores.submit(requests=lines(3), task="describe")
    batch = stores.batches.get(batch_id)
    assert batch.status == BatchStatus.VALIDATING and batch.counts.items == 0 and batch.priority == "low"
    assert stores.tasks(batch_id) == ["visionq.batch_step"]


def test_every_line_becomes_one_item_in_chunks_and_a_step_run_again_admits_nothing_twice(stores):
    batch_id = stores.submit(requests=lines(10), task="describe")
    stores.run(batch_id)
    batch = stores.batches.get(batch_id)
    assert batch.status == BatchStatus.IN_PROGRESS and batch.input_done
    assert (batch.counts.lines, batch.counts.items, batch.counts.queued) == (10, 10, 10)
    items = stores.results(batch_id)
    assert [item["custom_id"] for item in items] == [f"item-{i}" for i in range(10)]
    job = stores.jobs.get(items[3]["id"])
    assert (job.batch_id, job.custom_id, job.priority, job.owner) == (batch_id, "item-3", "low", "owner-a")
    # A redelivered step starts again from the first line: every item is found again, none is made twice.
    stores.batches.redis.hset(batch_key(batch_id), mapping={"phase": "admitting", "lines": 0, "offset": 0})
    queued_before = stores.jobs.status_counts().get("queued")
    stores.run(batch_id)
    assert stores.results(batch_id) == items
    assert stores.batches.get(batch_id).counts.queued == 10
    assert stores.jobs.status_counts().get("queued") == queued_before


def test_bad_lines_go_to_the_errors_file_and_the_rest_run(stores):
    requests = [*lines(2), {"custom_id": "item-0", "images": ["x.png"]}, {"images": ["x.png"]}, "nope",
                {"custom_id": "odd", "task": "paint", "images": ["x.png"]}, *lines(1, start=9)]
    batch_id = stores.submit(requests=requests, task="describe")
    stores.run(batch_id)
    batch = stores.batches.get(batch_id)
    assert (batch.counts.items, batch.counts.refused, batch.counts.lines) == (3, 4, 7)
    refused = [json.loads(raw) for raw in stores.batches.refusals(batch_id, 0, 100)]
    assert [(r["line"], r["error"]["code"]) for r in refused] == [
        (3, "duplicate_custom_id"), (4, "invalid_line"), (5, "invalid_line"), (6, "unknown_task")]
    assert refused[0]["custom_id"] == "item-0" and "line 1" in refused[0]["error"]["message"]


def test_counts_follow_the_transitions_and_the_last_end_ends_the_batch_once(stores):
    batch_id = stores.submit(requests=lines(3), task="describe")
    stores.run(batch_id)
    first, second, third = (item["id"] for item in stores.results(batch_id))
    stores.jobs.mark_running(first, "w")
    counts = stores.batches.get(batch_id).counts
    assert (counts.queued, counts.running) == (2, 1)
    stores.jobs.mark_running(first, "w")  # a redelivery: still one running
    assert stores.batches.get(batch_id).counts.running == 1
    stores.end_all(batch_id, fail={"item-1"})
    stores.jobs.mark_canceled(first, JobFailure(code="canceled", message="again"))  # ended already: no move
    batch = stores.batches.get(batch_id)
    assert (batch.counts.succeeded, batch.counts.failed, batch.counts.queued, batch.counts.running) == (2, 1, 0, 0)
    assert stores.tasks(batch_id).count("visionq.batch_finish") == 1  # the last end queued the finish step, once
    assert batch.status == BatchStatus.IN_PROGRESS and batch.finished_at is None  # until that step has run
    assert stores.finish(batch_id)
    batch = stores.batches.get(batch_id)
    assert batch.status == BatchStatus.COMPLETED and batch.finished_at is not None and batch.eta_s is None


def test_the_finish_step_tells_the_end_once_with_the_batch_as_its_body(stores):
    batch_id = stores.submit(requests=lines(2), task="describe",
                             webhook={"url": "http://127.0.0.5/batch-hook"})
    stores.run(batch_id)
    stores.end_all(batch_id)
    assert stores.ending.finish(batch_id, 1)
    assert stores.ending.finish(batch_id, 1)  # redelivered: nothing more is sent
    [delivery] = stores.batches.redis.lrange(deliveries_key(batch_id), 0, -1)
    fields = stores.batches.redis.hgetall(delivery_key(batch_id, delivery))
    event = json.loads(fields["payload"])
    assert (fields["type"], fields["event_id"], fields["url"]) == ("batch.completed", f"msg_{batch_id}",
                                                                    "http://127.0.0.5/batch-hook")
    assert event["type"] == "batch.completed" and event["data"]["counts"]["succeeded"] == 2
    assert event["timestamp"] == event["data"]["finished_at"]
    ttl = stores.batches.redis.ttl(batch_key(batch_id))
    assert 0 < ttl <= stores.settings.result_ttl_s
    assert 0 < stores.batches.redis.ttl(job_key(stores.results(batch_id)[0]["id"])) <= stores.settings.result_ttl_s


def test_items_send_no_event_to_the_key_s_endpoints_unless_the_batch_asked(stores):
    from shared.webhooks.store import WebhookStore

    hooks = WebhookStore(stores.batches.redis, stores.batches.webhook_queue)
    hooks.add_endpoint("owner-q", "https://example.com/all", ["job.succeeded", "batch.completed"], None, 10)
    quiet = stores.submit(owner="owner-q", requests=lines(1), task="describe")
    asked = stores.submit(owner="owner-q", requests=lines(1), task="describe",
                          webhook={"url": "http://127.0.0.5/h", "events": ["batch.completed", "job.succeeded"]})
    for batch_id in (quiet, asked):
        stores.run(batch_id)
        stores.end_all(batch_id)
        stores.ending.finish(batch_id, 1)
    quiet_item, asked_item = stores.results(quiet)[0]["id"], stores.results(asked)[0]["id"]
    assert [d.type for d in hooks.deliveries(quiet_item)] == []
    assert {d.url for d in hooks.deliveries(asked_item)} == {"https://example.com/all", "http://127.0.0.5/h"}
    assert [d.type for d in hooks.deliveries(quiet)] == ["batch.completed"]  # the endpoint wants batch events


def test_a_canceled_batch_admits_nothing_more_and_ends_when_its_items_have(stores):
    batch_id = stores.submit(requests=lines(10), task="describe", webhook={"url": "http://127.0.0.5/h"})
    stores.creator.step(batch_id, "test")  # one step: a chunk of 4, then its next step is queued
    assert stores.batches.get(batch_id).counts.items >= 4
    assert stores.batches.cancel(batch_id) == (True, "in_progress")
    assert stores.batches.cancel(batch_id) == (False, "canceled")
    stores.run(batch_id)  # the step stops reading
    admitted = stores.batches.get(batch_id).counts.items
    stores.ending.cancel(batch_id)
    assert stores.finish(batch_id)
    batch = stores.batches.get(batch_id)
    assert batch.status == BatchStatus.CANCELED and batch.finished_at is not None and batch.input_done
    assert (batch.counts.items, batch.counts.canceled, batch.counts.queued) == (admitted, admitted, 0)
    assert told(stores, batch_id) == ["batch.canceled"]


def test_retry_gives_the_failed_items_a_new_attempt_with_the_same_custom_ids(stores):
    batch_id = stores.submit(requests=lines(6), task="describe")
    assert stores.batches.reopen(batch_id) == "validating"
    stores.run(batch_id)
    stores.end_all(batch_id, fail={"item-1", "item-4"})
    assert stores.batches.reopen(batch_id) == "in_progress"  # its end is not told yet
    stores.ending.finish(batch_id, 1)
    before = {item["custom_id"]: item for item in stores.results(batch_id)}
    assert stores.batches.reopen(batch_id) == ""
    stores.run(batch_id)
    after = {item["custom_id"]: item for item in stores.results(batch_id)}
    assert {cid for cid in after if after[cid]["id"] != before[cid]["id"]} == {"item-1", "item-4"}
    assert after["item-1"]["status"] == "queued"
    retried = stores.jobs.get(after["item-1"]["id"])
    assert retried.custom_id == "item-1" and retried.images == ["bar_chart.png"]
    batch = stores.batches.get(batch_id)
    assert (batch.status, batch.attempt, batch.counts.failed, batch.counts.queued) == ("in_progress", 2, 0, 2)
    stores.end_all(batch_id)
    stores.ending.finish(batch_id, 2)
    batch = stores.batches.get(batch_id)
    assert (batch.status, batch.counts.succeeded, batch.counts.items) == ("completed", 6, 6)
    assert stores.batches.reopen(batch_id) == "nothing_failed"
    deliveries_of_attempts = stores.batches.redis.hget(batch_key(batch_id), "notified")
    assert deliveries_of_attempts == "2"


def test_items_fill_their_share_of_the_key_s_cap_and_wait_for_room(stores):
    _, key = stores.keys.create("capped", max_active_jobs=5)
    batch_id = stores.submit(owner=key.id, requests=lines(12), task="describe")
    stores.run(batch_id)  # 90% of 5: 4 items, then it waits
    assert stores.batches.get(batch_id).counts.items == 4
    assert stores.batches.redis.zscore(stores.batches.due_key, batch_id) is not None
    stores.end_all(batch_id)
    stores.run(batch_id)  # the poller would queue it: room for 4 more
    batch = stores.batches.get(batch_id)
    assert (batch.counts.items, batch.counts.succeeded, batch.counts.queued) == (8, 4, 4)
    stores.end_all(batch_id)
    stores.run(batch_id)
    stores.end_all(batch_id)
    stores.finish(batch_id)
    batch = stores.batches.get(batch_id)
    assert (batch.status, batch.counts.items, batch.counts.succeeded) == ("completed", 12, 12)


def test_a_strict_batch_with_a_bad_line_admits_none(stores):
    from shared.images.uploads import UploadStore

    uploads = UploadStore(stores.settings, connect(stores.settings, decode_responses=False))
    data = "".join(json.dumps(line) + "\n" for line in [*lines(5), {"custom_id": "item-2", "images": ["y.png"]}])
    import io

    upload = uploads.put_stream("owner-s", io.BytesIO(data.encode()), 10**6)
    batch_id = stores.submit(owner="owner-s", input_file=upload.ref, task="describe", strict=True,
                             webhook={"url": "http://127.0.0.5/h"})
    assert stores.batches.redis.exists(upload_key(upload.ref[len("upload://"):])) == 0  # the batch took it
    stores.run(batch_id)
    stores.finish(batch_id)
    batch = stores.batches.get(batch_id)
    assert (batch.status, batch.counts.items, batch.counts.refused) == ("failed", 0, 1)
    assert batch.error.code == "invalid_lines" and batch.finished_at is not None
    assert told(stores, batch_id) == ["batch.failed"]


def test_an_upload_of_another_key_is_not_an_input(stores):
    import io

    from shared.batches.batch import BatchRequest, new_batch_id
    from shared.batches.intake import accept
    from shared.images.refs import Access
    from shared.store.batches import NewBatch

    uploads = UploadStore(stores.settings, connect(stores.settings, decode_responses=False))
    upload = uploads.put_stream("owner-x", io.BytesIO(b'{"custom_id": "a"}\n'), 10**6)
    batch_id = new_batch_id()
    intake = accept(BatchRequest(input_file=upload.ref), stores.settings, Access("owner-y"), batch_id)
    created = stores.batches.create(NewBatch(batch_id, "owner-y", intake.spec, 0.0), None, "", intake.upload_id)
    assert created.outcome == "input_not_found" and stores.batches.get(batch_id) is None


def test_the_same_idempotency_key_is_the_same_batch(stores):
    first = stores.submit(idempotency="k-1", requests=lines(2), task="describe")
    again = stores.submit(idempotency="k-1", requests=lines(2), task="describe")
    assert again == first


def test_a_batch_keeps_the_uploads_its_lines_name_as_long_as_its_results(stores):
    from shared.images.uploads import UploadStore
    from tests.images import png

    uploads = UploadStore(stores.settings, connect(stores.settings, decode_responses=False))
    refs = [uploads.put("owner-u", png()).ref for _ in range(3)]
    batch_id = stores.submit(owner="owner-u", task="describe",
                             requests=[{"custom_id": str(i), "images": [ref]} for i, ref in enumerate(refs)])
    stores.run(batch_id)
    for ref in refs:
        ttl = stores.batches.redis.ttl(upload_key(ref[len("upload://"):]))
        assert stores.settings.upload_ttl_s < ttl <= stores.settings.result_ttl_s


def test_a_running_batch_renews_its_items_lifetimes_and_an_ended_one_leaves_the_renewals(settings):
    stores = make_stores(settings, result_ttl_s=400, batch_chunk_items=4)
    batch_id = stores.submit(requests=lines(3), task="describe")
    stores.run(batch_id)
    first, second, _ = (item["id"] for item in stores.results(batch_id))
    stores.jobs.mark_running(first, "w")
    stores.jobs.mark_succeeded(first, RESULT)
    assert stores.batches.take_open() == []  # not due before RESULT_TTL_S / 4
    for job_id in (first, second):  # an ended item, and one still queued, each about to expire
        stores.batches.redis.expire(job_key(job_id), 5)
    stores.batches.redis.zadd(stores.batches.open_key, {batch_id: 0})
    assert batch_id in stores.batches.take_open()
    stores.creator.keep(batch_id)
    assert all(300 < stores.batches.redis.ttl(job_key(job_id)) <= 400 for job_id in (first, second))
    stores.end_all(batch_id)
    stores.finish(batch_id)
    assert stores.batches.redis.zscore(stores.batches.open_key, batch_id) is None


def test_a_step_that_breaks_leaves_the_batch_to_be_tried_again(stores, caplog):
    batch_id = stores.submit(requests=lines(2), task="describe")
    stores.batches.redis.hset(batch_key(batch_id), "spec", "{broken")  # what a bug would leave
    stores.creator.step(batch_id, "test")
    assert stores.batches.redis.zscore(stores.batches.due_key, batch_id) is not None
    assert "step failed" in caplog.text
    assert stores.batches.redis.get(batch_lock_key(batch_id)) is None  # the lock is given back
