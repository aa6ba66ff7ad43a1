"""The one place where errors become HTTP answers: `{"error": {"code", "message"}}` with a stable code."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from shared.errors import VisionqError

log = logging.getLogger(__name__)

# Werkzeug's own errors (routing, size limits) get codes of the same kind as ours.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def register(app: Flask) -> None:
    """Install the handler on the app."""
    for kind in (VisionqError, HTTPException, redis.RedisError, Exception):
        app.register_error_handler(kind, _answer)


def error_payload(exc: Exception) -> tuple[dict, int, dict[str, str]]:
    """The body, status and headers an error is answered with, through Flask or below it (api/fast_poll.py).
    Call it while the exception is being handled: an unexpected one logs its traceback."""
    if isinstance(exc, VisionqError):
        return {"error": exc.to_dict()}, exc.http_status, exc.headers
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        return _body(HTTP_CODES.get(status, f"http_{status}"), exc.description or exc.name), status, {}
    if isinstance(exc, redis.RedisError):
        log.warning("job store unavailable: %s", type(exc).__name__)
        return _body("store_unavailable", "the job store cannot be reached; try again shortly"), 503, {}
    log.exception("unhandled error")  # the traceback goes to the log, never to the client
    return _body("internal_error", "internal server error"), 500, {}


def _body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _answer(exc: Exception):
    body, status, headers = error_payload(exc)
    return jsonify(body), status, headers
