"""The batches resource: POST /v1/batches accepts a batch at once (202, status validating) and leaves reading and
admitting its lines to the batch worker (shared/batches/); GET /v1/batches/<id> reads one, GET /v1/batches lists
the caller's; /results and /errors stream its files (JSONL); /cancel and /retry; /deliveries its webhook
deliveries."""

from __future__ import annotations

import hashlib
import logging
import time

from flask import Blueprint, Response, g, request, stream_with_context
from pydantic import ValidationError

from api.auth import authenticate, charge_now
from api.context import services
from api.deliveries import public as public_delivery
from api.jobs import caller_access, encode_cursor, invalid_fields, list_parameters
from shared.batches.batch import Batch, BatchRequest, BatchStatus, new_batch_id
from shared.batches.intake import accept
from shared.batches.results import error_lines, result_lines
from shared.errors import (
    AlreadyFinished,
    BatchNotFinished,
    IdempotencyConflict,
    InputNotFound,
    NotFound,
    NothingToRetry,
    NotRetryable,
    UnsupportedMediaType,
)
from shared.store.batches import NewBatch
from shared.store.keys import BATCH_ID_PREFIX

log = logging.getLogger(__name__)
bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(authenticate)

NOT_FOUND_MESSAGE = "no batch with this id (it may have expired)"
JSONL = "application/jsonl"


@bp.post("")
def create_batch():
    """Accept a batch: 202 with the batch (validating) and its Location; a repeated Idempotency-Key with the same
    body gives the same batch."""
    svc = services()
    charge_now()
    body, digest = parse_body()
    batch_id = new_batch_id()
    intake = accept(body, svc.settings, caller_access(), batch_id)
    created = svc.batches.create(NewBatch(batch_id, g.key.id, intake.spec, time.time()),
                                 request.headers.get("Idempotency-Key"), digest, intake.upload_id, list(intake.chunks))
    if created.outcome == "input_not_found":
        raise InputNotFound("input_file is no upload of this key's (or it has expired, or a batch took it)")
    if created.outcome == "existing":
        return replay(created.batch_id, created.same_request)
    log.info("batch accepted", extra={"batch_id": batch_id, "input": intake.spec.input.kind})
    return batch_response(svc.batches.get(batch_id), 202, {"Location": f"/v1/batches/{batch_id}"})


def parse_body() -> tuple[BatchRequest, str]:
    if not request.is_json:
        raise UnsupportedMediaType()
    try:
        body = BatchRequest.model_validate_json(request.get_data(cache=False))
    except ValidationError as exc:
        raise invalid_fields(exc) from None
    return body, hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def replay(batch_id: str, same_request: bool) -> Response:
    if not same_request:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
    batch = services().batches.get(batch_id)
    if batch is None:
        raise NotFound("the batch this Idempotency-Key created has expired")
    return batch_response(batch, 202, {"Location": f"/v1/batches/{batch_id}", "Idempotent-Replayed": "true"})


@bp.get("")
def list_batches():
    """The caller's batches, newest first: ?status=&limit=&cursor=."""
    svc = services()
    charge_now()
    status, limit, before = list_parameters(svc.settings, BatchStatus)
    batches, next_before = svc.batches.list(g.key.id, status, limit, before)
    return {"batches": [batch.public() for batch in batches],
            "next_cursor": encode_cursor(next_before) if next_before is not None else None}


@bp.get("/<batch_id>")
def get_batch(batch_id: str):
    """The batch: status, counts by job status, progress, timestamps, ETA."""
    charge_now()
    return batch_response(owned(batch_id))


@bp.get("/<batch_id>/results")
def batch_results(batch_id: str):
    """One JSON line per item (custom_id, job id, status, result or error), streamed."""
    charge_now()
    owned(batch_id)
    lines = result_lines(services().batches, batch_id)
    return Response(stream_with_context(lines), mimetype=JSONL)


@bp.get("/<batch_id>/errors")
def batch_errors(batch_id: str):
    """One JSON line per refused line (line, custom_id when it had one, error {code, message}), streamed."""
    charge_now()
    owned(batch_id)
    return Response(stream_with_context(error_lines(services().batches, batch_id)), mimetype=JSONL)


@bp.post("/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancel a batch that has not ended: no item starts after this, queued items are canceled and running ones
    stop at their next decode step; the batch.canceled event comes once they have."""
    svc = services()
    charge_now()
    owned(batch_id)
    applied, previous = svc.batches.cancel(batch_id)
    if not applied:
        if not previous:
            raise NotFound(NOT_FOUND_MESSAGE)
        raise AlreadyFinished(f"the batch has already {'ended: ' if previous != 'canceled' else 'been '}{previous}")
    return batch_response(svc.batches.get(batch_id))


RETRY_REFUSALS = {
    "validating": BatchNotFinished, "in_progress": BatchNotFinished,
    "failed": NotRetryable, "canceled": NotRetryable, "nothing_failed": NothingToRetry,
}


@bp.post("/<batch_id>/retry")
def retry_batch(batch_id: str):
    """A new attempt for the items that failed (same custom_ids); the batch is in progress again, and tells its
    end again when they have ended."""
    svc = services()
    charge_now()
    owned(batch_id)
    why = svc.batches.reopen(batch_id)
    if why == "missing":
        raise NotFound(NOT_FOUND_MESSAGE)
    if why:
        raise RETRY_REFUSALS[why]()
    return batch_response(svc.batches.get(batch_id), 202)


@bp.get("/<batch_id>/deliveries")
def batch_deliveries(batch_id: str):
    """The webhook deliveries of the batch's end events, with their attempts."""
    svc = services()
    charge_now()
    owned(batch_id)
    return {"deliveries": [public_delivery(delivery) for delivery in svc.hooks.deliveries(batch_id)]}


def owned(batch_id: str) -> Batch:
    """The batch if the caller's key made it; anyone else's answers exactly as an unknown id."""
    batch = services().batches.get(batch_id) if batch_id.startswith(BATCH_ID_PREFIX) else None
    if batch is None or batch.owner != g.key.id:
        raise NotFound(NOT_FOUND_MESSAGE)
    return batch


def batch_response(batch: Batch, status: int = 200, headers: dict | None = None) -> Response:
    return Response(batch.model_dump_json(exclude_none=True), status=status, headers=headers,
                    mimetype="application/json")
