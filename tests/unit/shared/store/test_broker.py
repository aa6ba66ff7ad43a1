"""The broker: the queue message the API writes must be the one Celery itself would send, or workers would not run
it; lease renewal touches only unacknowledged messages; the sweep finds lost messages and only those."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest

from shared.jobs import JobStatus
from shared.store.broker import (
    DELIVER_WEBHOOK_TASK,
    DISPATCH_WEBHOOKS_TASK,
    RUN_JOB_TASK,
    Broker,
    make_celery,
    run_job_message,
    task_message,
)
from shared.store.keys import KOMBU_UNACKED_INDEX as UNACKED_INDEX
from tests.jobs import make_job


@pytest.fixture
def celery_sent(settings, store) -> dict:
    """What Celery's own send_task puts on a scratch queue, read back from Redis."""
    app = make_celery(settings)
    app.send_task(RUN_JOB_TASK, args=["job-1"], queue="queue-format-test", task_id="job-1", ignore_result=True)
    return json.loads(store.redis.lpop("queue-format-test"))


def decode(message: dict) -> dict:
    message = dict(message)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_message_has_celerys_shape_and_values(celery_sent):
    assert_same_message(run_job_message("job-1", "queue-format-test"), celery_sent)


@pytest.mark.parametrize(("task", "args"), [(DISPATCH_WEBHOOKS_TASK, []), (DELIVER_WEBHOOK_TASK, ["job-1", "job"])])
def test_webhook_task_messages_are_celerys_too(settings, store, task, args):
    make_celery(settings).send_task(task, args=args, queue="queue-format-test", task_id="t-1", ignore_result=True)
    theirs = json.loads(store.redis.lpop("queue-format-test"))
    assert_same_message(task_message(task, args, "queue-format-test", "t-1"), theirs)


def assert_same_message(our_message: str, celery_sent: dict) -> None:
    ours, theirs = decode(json.loads(our_message)), decode(celery_sent)
    assert ours["body"] == theirs["body"]
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    for key in ("content-type", "content-encoding"):
        assert ours[key] == theirs[key]
    varying = {"origin", "ignore_result"}  # who sent it; we ignore results on purpose
    assert {k: v for k, v in ours["headers"].items() if k not in varying} == {
        k: v for k, v in theirs["headers"].items() if k not in varying}
    varying = {"delivery_tag", "reply_to"}
    assert {k: v for k, v in ours["properties"].items() if k not in varying} == {
        k: v for k, v in theirs["properties"].items() if k not in varying}


def test_renew_moves_held_messages_to_now_and_adds_nothing(store):
    held, acked = f"test-{uuid.uuid4()}", f"test-{uuid.uuid4()}"
    store.redis.zadd(UNACKED_INDEX, {held: time.time() - 50})
    try:
        assert Broker(store.redis).renew_leases([held, acked]) == 1
        assert store.redis.zscore(UNACKED_INDEX, held) > time.time() - 5
        assert store.redis.zscore(UNACKED_INDEX, acked) is None  # acknowledged meanwhile: not brought back
        assert Broker(store.redis).renew_leases([]) == 0
    finally:
        store.redis.zrem(UNACKED_INDEX, held)


@pytest.fixture
def broker(store) -> Broker:
    return Broker(store.redis)


def _fresh_queue(store) -> str:
    queue = f"lost-test-{time.monotonic_ns()}"
    store.redis.delete(queue)
    return queue


def test_a_job_whose_message_was_lost_is_queued_again_after_the_grace(store, broker):
    queue = _fresh_queue(store)
    lost, later = make_job(), make_job()
    store.create(lost, queue)
    store.create(later, queue)
    # A worker took both messages in order; a Redis crash kept the first job but lost its message.
    store.redis.rpop(queue)
    store.redis.rpop(queue)
    store.mark_running(later.id, "w1")
    assert broker.requeue_lost(queue, grace_s=60, now=1000.0) == []  # first seen below the watermark
    assert broker.requeue_lost(queue, grace_s=60, now=1030.0) == []  # within the grace
    assert broker.requeue_lost(queue, grace_s=60, now=1061.0) == [lost.id]
    assert lost.id in store.redis.lindex(queue, 0)
    assert store.status(lost.id) == JobStatus.QUEUED
    assert broker.requeue_lost(queue, grace_s=60, now=2000.0) == []  # its new message is newer than the watermark


def test_a_job_a_worker_still_holds_or_that_moved_on_is_left_alone(store, broker):
    queue = _fresh_queue(store)
    held, started, later = make_job(), make_job(), make_job()
    for job in (held, started, later):
        store.create(job, queue)
    messages = [store.redis.rpop(queue) for _ in range(3)]
    store.redis.hset("unacked", f"tag-{held.id}", messages[0])  # as kombu keeps a delivered message
    store.mark_running(later.id, "w1")
    broker.requeue_lost(queue, grace_s=60, now=1000.0)
    store.mark_running(started.id, "w1")  # its worker was only slow to start it
    assert broker.requeue_lost(queue, grace_s=60, now=1100.0) == []
    assert store.redis.llen(queue) == 0
    store.redis.hdel("unacked", f"tag-{held.id}")


def test_nothing_is_requeued_while_jobs_wait_their_turn(store, broker):
    queue = _fresh_queue(store)
    jobs = [make_job() for _ in range(3)]
    for job in jobs:
        store.create(job, queue)
    assert broker.requeue_lost(queue, grace_s=0, now=1000.0) == []
    assert broker.requeue_lost(queue, grace_s=0, now=5000.0) == []  # no job started past them; queue not empty
    assert store.redis.llen(queue) == 3
