"""The jobs resource: POST /v1/jobs submits, GET /v1/jobs/<id> reads (and can wait for the end)."""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from enum import StrEnum

from flask import Blueprint, Response, g, request
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from api.auth import authenticate, charge_now, check_rate
from api.context import Services, services
from api.uploads import read_files, store_images
from shared.admission import build_job, check_image_count
from shared.config import Settings
from shared.errors import (
    AlreadyFinished,
    IdempotencyConflict,
    InvalidJson,
    InvalidParameter,
    InvalidRequest,
    NotFound,
    QueueFull,
    UnsupportedMediaType,
    VisionqError,
)
from shared.images.refs import Access
from shared.jobs import Job, JobFailure, JobRequest, JobStatus
from shared.keys import ApiKey
from shared.routing import queue_for
from shared.store.rates import UNLIMITED, Charge

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)


@bp.post("")
def submit_job():
    """Accept a job: 202 with the queued job and its Location; a repeated Idempotency-Key gives the same job.
    The body is JSON, or multipart/form-data with the images inline (stored as uploads)."""
    return admit(request.form if request.mimetype == "multipart/form-data" else None)


def admit(form: MultiDict | None) -> Response:
    """Validate, write and enqueue the request's job for g.key: from the JSON body, or from these multipart form
    fields and the request's files (the web console's submit form comes this way too)."""
    svc = services()
    multipart = form is not None
    if multipart:
        charge_now()  # before any image is stored: a request over its key's rate stores nothing
    try:
        request_body, digest = parse_multipart(svc.settings, form) if multipart else parse_json()
        job = build_job(request_body, svc.settings, caller_access()).model_copy(update={"owner": g.key.id})
    except VisionqError:
        if not multipart:
            charge_now()  # a rejected request still counts against the key's rate
        raise
    idempotency = request.headers.get("Idempotency-Key")
    created = svc.store.create(job, queue_for(svc.settings, job.model), max_active=g.key.limits(svc.settings)[2],
                               idempotency=idempotency, request_hash=digest,
                               charge=UNLIMITED if multipart else g.charge)
    check_rate(created.retry_after_s)
    if created.outcome == "queue_full":
        raise QueueFull()
    if created.outcome == "existing":
        return replay(created.job_id, created.same_request)
    log.info("job accepted", extra={"job_id": job.id, "model": job.model, "task": job.task})
    return job_response(job, 202, {"Location": f"/v1/jobs/{job.id}"})


def caller_access() -> Access:
    """What the caller's image refs may reach: its uploads and its key's S3 buckets."""
    return Access(g.key.id, frozenset(g.key.s3_buckets), services().uploads)


@bp.get("")
def list_jobs():
    """The caller's jobs, newest first: ?status=&limit=&cursor=."""
    svc = services()
    charge_now()
    status, limit, before = list_parameters(svc.settings)
    jobs, next_before = svc.store.list_jobs(g.key.id, status, limit, before)
    return {"jobs": [job.public() for job in jobs],
            "next_cursor": encode_cursor(next_before) if next_before is not None else None}


@bp.get("/<job_id>")
def get_job(job_id: str):
    """The job as it stands, or once it ends when ?wait=<seconds> is given."""
    svc = services()
    body = poll(svc, g.key, g.charge, job_id, wait_seconds(svc.settings))
    return Response(body, mimetype="application/json")


def poll(svc: Services, key: ApiKey, charge: Charge, job_id: str, wait: float = 0.0) -> str:
    """The public JSON of the key's job, charged to its bucket; after up to `wait` seconds for its end. Shared by
    the view and the WSGI fast path that answers most polls below Flask (api/fast_poll.py)."""
    cached = svc.finished.get(job_id)
    if cached is not None:  # ended: the poll costs only its rate-limit check
        check_rate(svc.rates.take(charge))
        if cached.owner != key.id:
            raise NotFound(NOT_FOUND_MESSAGE)
        return cached.body
    wait_s, job = svc.store.charged_get(job_id, charge)
    check_rate(wait_s)
    job = owned_by(job, key)  # before any wait: another key's job must answer at once, as unknown
    if wait and not job.status.is_terminal():
        job = svc.store.wait(job_id, wait) or job
    svc.finished.remember(job)
    return job.public_json()


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel a queued or running job; a running one stops at its next decode step."""
    svc = services()
    charge_now()
    owned(svc.store.get(job_id))
    transition = svc.store.mark_canceled(job_id, JobFailure(code="canceled", message="canceled by the client"))
    if not transition.applied:
        if transition.previous is None:
            raise NotFound(NOT_FOUND_MESSAGE)
        previous = transition.previous.value
        raise AlreadyFinished(f"the job has already {'been ' if previous == 'canceled' else 'ended: '}{previous}")
    return job_response(svc.store.get(job_id))


NOT_FOUND_MESSAGE = "no job with this id (it may have expired)"


def job_response(job: Job, status: int = 200, headers: dict | None = None) -> Response:
    return Response(job.public_json(), status=status, headers=headers, mimetype="application/json")


def owned(job: Job | None) -> Job:
    """The job if the caller's key made it; anyone else's job answers exactly as an unknown id."""
    return owned_by(job, g.key)


def owned_by(job: Job | None, key: ApiKey) -> Job:
    """The job if `key` made it (outside Flask's request too: the poll's fast path), else NotFound."""
    if job is None or job.owner != key.id:
        raise NotFound(NOT_FOUND_MESSAGE)
    return job


def replay(job_id: str, same_request: bool):
    if not same_request:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
    job = services().store.get(job_id)
    if job is None:
        raise NotFound("the job this Idempotency-Key created has expired")
    return job_response(job, 202, {"Location": f"/v1/jobs/{job.id}", "Idempotent-Replayed": "true"})


def request_hash(body: JobRequest) -> str:
    """A digest of the request as the client sent it, to tell a repeat from a different request."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def list_parameters(settings: Settings,
                    statuses: type[StrEnum] = JobStatus) -> tuple[StrEnum | None, int, float | None]:
    """?status= (one of `statuses`), ?limit= and ?cursor= of a listing."""
    args = request.args
    try:
        status = statuses(args["status"]) if args.get("status") else None
    except ValueError:
        raise InvalidParameter(f"status must be one of: {', '.join(s.value for s in statuses)}") from None
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        raise InvalidParameter("limit must be a whole number") from None
    if not 1 <= limit <= settings.list_max_limit:
        raise InvalidParameter(f"limit must be from 1 to {settings.list_max_limit}")
    cursor = args.get("cursor")
    return status, limit, decode_cursor(cursor) if cursor else None


def encode_cursor(before: float) -> str:
    return base64.urlsafe_b64encode(repr(before).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> float:
    try:
        value = float(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameter("cursor is not one this server gave") from None
    if not math.isfinite(value):
        raise InvalidParameter("cursor is not one this server gave")
    return value


def parse_json() -> tuple[JobRequest, str]:
    """The JSON body as a JobRequest, and its digest; malformed JSON and wrong shapes are told apart."""
    if not request.is_json:
        raise UnsupportedMediaType("the body must be JSON, or multipart/form-data with the images inline")
    try:
        body = JobRequest.model_validate_json(request.get_data(cache=False))
    except ValidationError as exc:
        raise invalid_fields(exc) from None
    return body, request_hash(body)


def parse_multipart(settings: Settings, form: MultiDict) -> tuple[JobRequest, str]:
    """A multipart body: form fields task, question, max_new_tokens, num_crops and images (refs), then the image
    files, which are stored as uploads of the caller and follow the `images` refs in the job, in the order sent. The
    digest (for Idempotency-Key) covers the files' contents, not the upload ids this request made."""
    files = read_files(settings)
    fields: dict = {name: form.get(name) for name in form if name != "images"}
    fields["images"] = form.getlist("images")
    for name in ("max_new_tokens", "num_crops"):
        if fields.get(name) is not None:
            fields[name] = form_int(fields[name])
    if fields.get("start_within_s") is not None:
        fields["start_within_s"] = form_number(fields["start_within_s"])
    fields["images"] += ["sha256:" + hashlib.sha256(data).hexdigest() for data in files]
    try:
        described = JobRequest.model_validate(fields)
    except ValidationError as exc:
        raise invalid_fields(exc) from None
    check_image_count(len(described.images), 1, settings.max_images, settings)
    refs = form.getlist("images") + [upload.ref for upload in store_images(files, settings)]
    return described.model_copy(update={"images": refs}), request_hash(described)


def form_int(value: str) -> int | str:
    """A form field as a number; anything else stays a string, which the model refuses as mistyped."""
    try:
        return int(value)
    except ValueError:
        return value


def form_number(value: str) -> float | str:
    """A form field as a number of seconds; anything else stays a string, which the model refuses as mistyped."""
    try:
        return float(value)
    except ValueError:
        return value


def invalid_fields(exc: ValidationError) -> VisionqError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return InvalidJson()
    details = [{"field": ".".join(map(str, err["loc"])), "message": err["msg"]} for err in errors]
    return InvalidRequest("the request has missing, unknown or mistyped fields", details=details)


def wait_seconds(settings: Settings) -> float:
    """The ?wait parameter, from 0 to settings.max_wait_s."""
    if not request.query_string:  # most polls: no query to parse (request.args builds a MultiDict)
        return 0.0
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise InvalidParameter("wait must be a number of seconds") from None
    if not 0 <= wait <= settings.max_wait_s:
        raise InvalidParameter(f"wait must be from 0 to {settings.max_wait_s:g} seconds")
    return wait
