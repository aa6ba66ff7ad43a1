"""One line of a batch becomes a candidate item exactly when POST /v1/jobs would accept it as a job; else a
refusal with its line number and a stable code."""

from __future__ import annotations

import json

import pytest

from shared.batches.batch import BatchInput, BatchSpec, BatchWebhook, ItemDefaults
from shared.batches.lines import Candidate, LineContext, check_line, check_object
from shared.config import Settings
from shared.images.refs import Access
from shared.store.batches import Refusal

SETTINGS = Settings(max_new_tokens_limit=64)


def context(buckets: frozenset[str] = frozenset(), **spec) -> LineContext:
    fields = {"input": BatchInput(kind="requests"), "defaults": ItemDefaults(task="describe"), **spec}
    return LineContext("batch_x", "owner-1", BatchSpec(**fields), SETTINGS, Access("owner-1", buckets))


def line(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_good_line_is_a_job_of_its_batch_with_the_batch_defaults():
    candidate = check_line(line(custom_id="a-1", images=["cat.png"]), 7, context(priority="low"))
    assert isinstance(candidate, Candidate) and candidate.line == 7
    job = candidate.job
    assert (job.task, job.images, job.owner, job.batch_id, job.custom_id) == ("describe", ["cat.png"], "owner-1",
                                                                            "batch_x", "a-1")
    assert job.priority == "low" and job.webhook is None
    assert job.max_new_tokens == 64  # the server's default, within its limit


def test_a_line_overrides_the_defaults_and_an_openai_style_line_is_its_body():
    plain = check_line(line(custom_id="a", task="ocr", images=["x.png"], max_new_tokens=5, priority="high"), 1,
                       context())
    openai = check_line(line(custom_id="a", method="POST", url="/v1/jobs",
                             body={"task": "ocr", "images": ["x.png"], "max_new_tokens": 5, "priority": "high"}),
                        1, context())
    for candidate in (plain, openai):
        assert (candidate.job.task, candidate.job.max_new_tokens, candidate.job.priority) == ("ocr", 5, "high")


def test_a_line_takes_the_batch_num_crops_unless_it_sets_its_own():
    spec = {"defaults": ItemDefaults(task="describe", num_crops=4)}
    assert check_line(line(custom_id="a", images=["x.png"]), 1, context(**spec)).job.num_crops == 4
    assert check_line(line(custom_id="a", images=["x.png"], num_crops=16), 1, context(**spec)).job.num_crops == 16


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "invalid_line"),
    (line(images=["x.png"]), "invalid_line"),  # no custom_id
    (line(custom_id="", images=["x.png"]), "invalid_line"),
    (line(custom_id="x" * 257, images=["x.png"]), "invalid_line"),
    (line(custom_id=5, images=["x.png"]), "invalid_line"),
    (line(custom_id="a", method="GET", url="/v1/jobs", body={}), "invalid_line"),
    (line(custom_id="a", url="/v1/other", body={}), "invalid_line"),
    (line(custom_id="a", body={}, extra=1), "invalid_line"),
    (line(custom_id="a", images=["x.png"], colour="red"), "invalid_request"),
    (line(custom_id="a", images="x.png"), "invalid_request"),
    (line(custom_id="a", images=["x.png"], priority="urgent"), "invalid_request"),
    (line(custom_id="a", task="paint", images=["x.png"]), "unknown_task"),
    (line(custom_id="a", images=["x.png", "y.png"]), "wrong_image_count"),
    (line(custom_id="a", images=["x.png"], max_new_tokens=65), "max_new_tokens_out_of_range"),
    (line(custom_id="a", images=["ftp://host/x.png"]), "invalid_image_ref"),
    (line(custom_id="a", images=["s3://not-mine/x.png"]), "image_bucket_not_allowed"),
    (line(custom_id="a", images=["../../etc/passwd"]), "invalid_image_ref"),
    (line(custom_id="a", images=["x.png"], model="other"), "unknown_model"),
    (line(custom_id="a", images=["x.png"], num_crops=17), "invalid_num_crops"),
    (line(custom_id="a", images=["x.png"], num_crops="4"), "invalid_request"),
])
def test_a_bad_line_is_refused_with_its_line_and_a_stable_code(raw, code):
    refusal = check_line(raw, 3, context())
    assert isinstance(refusal, Refusal), refusal
    assert (refusal.line, refusal.code) == (3, code)
    assert refusal.message


def test_a_refusal_keeps_the_custom_id_when_the_line_had_one():
    refusal = check_line(line(custom_id="keep-me", task="paint", images=["x.png"]), 2, context())
    assert refusal.custom_id == "keep-me"
    assert json.loads(refusal.to_json()) == {"line": 2, "custom_id": "keep-me", "error": {
        "code": "unknown_task", "message": refusal.message}}


def test_items_send_their_own_events_only_when_the_batch_asked():
    quiet = check_line(line(custom_id="a", images=["x.png"]), 1,
                       context(webhook=BatchWebhook(url="https://example.com/h", events=["batch.completed"])))
    asked = check_line(line(custom_id="a", images=["x.png"]), 1,
                       context(webhook=BatchWebhook(url="https://example.com/h",
                                                    events=["batch.completed", "job.failed"])))
    assert quiet.job.webhook is None
    assert asked.job.webhook.url == "https://example.com/h" and asked.job.webhook.events == ["job.failed"]


def test_an_object_under_a_prefix_is_an_item_if_its_name_is_an_image_s():
    granted = context(buckets=frozenset({"bucket-1"}))
    candidate = check_object("photos/a.JPG", "bucket-1", 4, granted)
    assert candidate.job.images == ["s3://bucket-1/photos/a.JPG"] and candidate.custom_id == "photos/a.JPG"
    refusal = check_object("photos/notes.txt", "bucket-1", 5, granted)
    assert (refusal.code, refusal.custom_id, refusal.line) == ("not_an_image", "photos/notes.txt", 5)
