"""The queue message the API writes must be the one Celery itself would send, or workers would not run it."""

from __future__ import annotations

import base64
import json

import pytest

from shared.store.broker import (
    DELIVER_WEBHOOK_TASK,
    DISPATCH_WEBHOOKS_TASK,
    RUN_JOB_TASK,
    make_celery,
    run_job_message,
    task_message,
)


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
