"""What a batch request must satisfy before it is stored: one input (a JSONL upload or S3 manifest, inline
requests, or an S3 prefix of images) that this key may read, item defaults and a webhook that POST /v1/jobs would
accept. Lines themselves are checked later, one by one, by the batch worker (shared/batches/lines.py), except a
strict batch's inline requests, which are checked here and refused at once."""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.admission import check_max_new_tokens, check_num_crops, check_question
from shared.batches.batch import BatchInput, BatchRequest, BatchSpec, ItemDefaults
from shared.batches.lines import DUPLICATE_CUSTOM_ID, Candidate, LineContext, check_line
from shared.config import Settings
from shared.errors import (
    ImageBucketNotAllowed,
    InputBucketNotAllowed,
    InvalidBatchInput,
    InvalidLines,
    InvalidRequest,
    TooManyItems,
    UnknownTask,
)
from shared.images.fetch import check_bucket
from shared.images.refs import UPLOAD_ID, Access
from shared.images.uploads import CHUNK_BYTES, SCHEME
from shared.outbound.s3 import BUCKET, parse_s3_uri
from shared.routing import resolve_model
from shared.store.batches import Refusal
from shared.tasks import TASKS
from shared.webhooks.events import BATCH_EVENTS, EVENTS
from shared.webhooks.targets import check_webhook

MAX_DETAILS = 50  # refused lines listed in the answer to a strict batch


@dataclass(frozen=True)
class Intake:
    """A batch request once checked: its spec, and its input as the store takes it."""

    spec: BatchSpec
    upload_id: str | None = None
    chunks: tuple[bytes, ...] = ()


def accept(body: BatchRequest, settings: Settings, access: Access, batch_id: str) -> Intake:
    """The checked batch, or the error that refuses the request."""
    given = [name for name in ("input_file", "requests", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        raise InvalidBatchInput("give exactly one of input_file, requests and images")
    defaults = check_defaults(body, settings)
    webhook = (check_webhook(body.webhook, settings, allowed=BATCH_EVENTS + EVENTS, default=BATCH_EVENTS)
               if body.webhook else None)
    intake = _intake(body, defaults, settings, access)
    spec = intake.spec.model_copy(update={"priority": body.priority, "strict": body.strict, "webhook": webhook})
    if body.requests is not None and body.strict:
        _check_now(body.requests, LineContext(batch_id, access.owner or "", spec, settings, access))
    return Intake(spec, intake.upload_id, intake.chunks)


def _intake(body: BatchRequest, defaults: ItemDefaults, settings: Settings, access: Access) -> Intake:
    """The batch's input as the store takes it (its spec holds the input and the defaults only)."""
    if body.input_file is not None:
        source = _input_file(body.input_file, settings, access)
        upload_id = body.input_file[len(SCHEME):] if source.kind == "upload" else None
        return Intake(BatchSpec(input=source, defaults=defaults), upload_id)
    if body.images is not None:
        return Intake(BatchSpec(input=_prefix(body.images, defaults, settings, access), defaults=defaults))
    return Intake(BatchSpec(input=BatchInput(kind="requests"), defaults=defaults), None,
                  _inline(body.requests, settings))


def check_defaults(body: BatchRequest, settings: Settings) -> ItemDefaults:
    """The options every item gets, checked as POST /v1/jobs checks them."""
    if body.task is not None and body.task not in TASKS:
        raise UnknownTask(f"task must be one of: {', '.join(TASKS)}")
    check_question(body.question, settings)
    if body.max_new_tokens is not None:
        check_max_new_tokens(body.max_new_tokens, settings)
    if body.model is not None:
        resolve_model(settings, body.model)
    # Against the batch's model when it names one; else each line is checked against its own (or the default).
    check_num_crops(body.num_crops, body.model, settings)
    return ItemDefaults(task=body.task, question=body.question, max_new_tokens=body.max_new_tokens,
                        model=body.model, num_crops=body.num_crops)


def _input_file(uri: str, settings: Settings, access: Access) -> BatchInput:
    if uri.startswith(SCHEME):
        if not UPLOAD_ID.match(uri[len(SCHEME):]):
            raise InvalidBatchInput("input_file is not an upload ref this server gave")
        return BatchInput(kind="upload", uri=uri)
    if not uri.startswith("s3://"):
        raise InvalidBatchInput("input_file must be upload://<id> (a JSONL upload) or s3://bucket/key")
    try:
        location = parse_s3_uri(uri)
    except ValueError as exc:
        raise InvalidBatchInput(f"input_file: {exc}") from None
    _check_bucket(location.bucket, settings, access)
    return BatchInput(kind="s3", uri=uri)


def _prefix(uri: str, defaults: ItemDefaults, settings: Settings, access: Access) -> BatchInput:
    bucket, _, _prefix_key = uri[len("s3://"):].partition("/") if uri.startswith("s3://") else ("", "", "")
    if not BUCKET.match(bucket):
        raise InvalidBatchInput("images must be an S3 prefix: s3://bucket/prefix/")
    if defaults.task is None:
        raise InvalidRequest("a batch of the images under a prefix needs task")
    _check_bucket(bucket, settings, access)
    return BatchInput(kind="s3_prefix", uri=uri)


def _check_bucket(bucket: str, settings: Settings, access: Access) -> None:
    try:
        check_bucket(bucket, access.buckets, settings)
    except ImageBucketNotAllowed:
        raise InputBucketNotAllowed(f"this API key may not read the S3 bucket {bucket!r}") from None


def _inline(requests: list, settings: Settings) -> tuple[bytes, ...]:
    """The inline requests as JSONL, in the chunks the batch worker reads."""
    if len(requests) > min(settings.batch_max_inline_requests, settings.batch_max_items):
        raise TooManyItems(f"at most {settings.batch_max_inline_requests} requests inline; put more in an "
                           "input_file")
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in requests).encode()
    return tuple(data[start:start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES))


def _check_now(requests: list, context: LineContext) -> None:
    """A strict batch's inline lines, checked before anything is stored: one refused, all are."""
    refusals, seen = [], {}
    for line, fields in enumerate(requests, start=1):
        outcome = check_line(json.dumps(fields), line, context)
        if isinstance(outcome, Candidate) and outcome.custom_id in seen:
            outcome = Refusal(line, DUPLICATE_CUSTOM_ID, f"custom_id {outcome.custom_id!r} is already line "
                              f"{seen[outcome.custom_id]}'s", outcome.custom_id)
        if isinstance(outcome, Refusal):
            refusals.append(outcome)
        else:
            seen[outcome.custom_id] = line
    if refusals:
        details = [json.loads(refusal.to_json()) for refusal in refusals[:MAX_DETAILS]]
        raise InvalidLines(f"{len(refusals)} of {len(requests)} lines were refused, so the strict batch is",
                           details=details)
