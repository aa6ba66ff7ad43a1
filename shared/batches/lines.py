"""One line of a batch: parsed, checked exactly as POST /v1/jobs checks a request (shared/admission.py), and made
a candidate item (a queued job with its custom_id) or a refusal with its line number and a stable code.

A line is `{"custom_id": ..., <the fields of POST /v1/jobs>}`, or OpenAI's `{"custom_id", "method": "POST",
"url": "/v1/jobs", "body": {...}}`; the batch's options (task, question, max_new_tokens, model, num_crops) fill in
what a line leaves out, and its priority is every item's unless the line names one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from shared.admission import build_job
from shared.batches.batch import PRIORITIES, BatchSpec
from shared.config import Settings
from shared.errors import VisionqError
from shared.images.refs import Access
from shared.jobs import Job, JobRequest, WebhookSpec
from shared.store.batches import Refusal

# Codes of refused lines besides those of POST /v1/jobs (unknown_task, wrong_image_count, invalid_image_ref, ...).
INVALID_JSON = "invalid_json"  # not JSON, or not UTF-8
INVALID_LINE = "invalid_line"  # not an object, no custom_id, an OpenAI line for another method or URL
LINE_TOO_LONG = "line_too_long"  # over settings.batch_max_line_bytes
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"  # another line has this custom_id
NOT_AN_IMAGE = "not_an_image"  # an object under an S3 prefix whose name is not an image's
TOO_MANY_ITEMS = "too_many_items"  # past settings.batch_max_items: this line and the rest are not read
INVALID_REQUEST = "invalid_request"

MAX_CUSTOM_ID_CHARS = 256
JOB_URLS = ("/v1/jobs",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Candidate:
    """A line that passed every check: the job it makes (not yet admitted: its custom_id may still turn out to be
    a duplicate, or the key's cap may be full)."""

    line: int
    job: Job

    @property
    def custom_id(self) -> str:
        return self.job.custom_id or ""


@dataclass(frozen=True)
class LineContext:
    """What every line of one batch is checked and completed with."""

    batch_id: str
    owner: str
    spec: BatchSpec
    settings: Settings
    access: Access


class LineRefused(Exception):
    """A line cannot become an item: its stable code and why."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


def check_line(raw: bytes | str, line: int, context: LineContext) -> Candidate | Refusal:
    """The candidate item of one JSONL line, or its refusal."""
    custom_id = None
    try:
        fields = _object(raw)
        custom_id = _custom_id(fields)
        return Candidate(line, _item(_request_fields(fields), custom_id, context))
    except LineRefused as refused:
        return Refusal(line, refused.code, refused.message, refused.custom_id or custom_id)
    except VisionqError as exc:
        return Refusal(line, exc.code, exc.message, custom_id)


def check_object(key: str, bucket: str, line: int, context: LineContext) -> Candidate | Refusal:
    """The candidate item of one object under a batch's S3 prefix (custom_id: its key), or its refusal."""
    if not key.lower().endswith(IMAGE_SUFFIXES):
        return Refusal(line, NOT_AN_IMAGE, f"{key} is not an image (by its name)", key)
    try:
        return Candidate(line, _item({"images": [f"s3://{bucket}/{key}"]}, key, context))
    except LineRefused as refused:
        return Refusal(line, refused.code, refused.message, key)
    except VisionqError as exc:
        return Refusal(line, exc.code, exc.message, key)


def _object(raw: bytes | str) -> dict:
    try:
        fields = json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        raise LineRefused(INVALID_JSON, "the line is not JSON (UTF-8)") from None
    if not isinstance(fields, dict):
        raise LineRefused(INVALID_LINE, "the line must be a JSON object")
    return fields


def _custom_id(fields: dict) -> str:
    custom_id = fields.pop("custom_id", None)
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        raise LineRefused(INVALID_LINE, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
    return custom_id


def _request_fields(fields: dict) -> dict:
    """The job's fields: the line's own, or the body of an OpenAI-style line."""
    if "body" not in fields:
        return fields
    method, url, body = fields.pop("method", "POST"), fields.pop("url", JOB_URLS[0]), fields.pop("body")
    if fields:
        raise LineRefused(INVALID_LINE, f"unknown fields beside body: {', '.join(sorted(fields))}")
    if method != "POST" or url not in JOB_URLS or not isinstance(body, dict):
        raise LineRefused(INVALID_LINE, "an OpenAI-style line must be {custom_id, method: POST, url: /v1/jobs, "
                          "body: {...}}")
    return body


def _item(fields: dict, custom_id: str, context: LineContext) -> Job:
    priority = fields.pop("priority", context.spec.priority)
    if priority not in PRIORITIES:
        raise LineRefused(INVALID_REQUEST, f"priority must be one of: {', '.join(PRIORITIES)}")
    defaults = context.spec.defaults.model_dump(exclude_none=True)
    try:
        request = JobRequest.model_validate({**defaults, **fields})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        where = ".".join(map(str, first["loc"]))
        raise LineRefused(INVALID_REQUEST, f"{where}: {first['msg']}" if where else first["msg"]) from None
    job = build_job(request, context.settings, context.access)
    return job.model_copy(update={"owner": context.owner, "priority": priority, "batch_id": context.batch_id,
                                  "custom_id": custom_id, "webhook": job.webhook or _item_webhook(context.spec)})


def _item_webhook(spec: BatchSpec) -> WebhookSpec | None:
    """The batch's webhook for the items' own events, when the batch asked for any (checked with the batch)."""
    events = spec.item_events()
    return WebhookSpec(url=spec.webhook.url, events=events) if events and spec.webhook else None
