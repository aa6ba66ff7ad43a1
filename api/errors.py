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
    """Install the handlers on the app."""
    app.register_error_handler(VisionqError, _visionq_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(redis.RedisError, _store_unavailable)
    app.register_error_handler(Exception, _unexpected_error)


def error_response(code: str, message: str, status: int):
    return jsonify(error={"code": code, "message": message}), status


def _visionq_error(exc: VisionqError):
    return jsonify(error=exc.to_dict()), exc.http_status, exc.headers


def _http_error(exc: HTTPException):
    status = exc.code or 500
    return error_response(HTTP_CODES.get(status, f"http_{status}"), exc.description or exc.name, status)


def _store_unavailable(exc: redis.RedisError):
    log.warning("job store unavailable: %s", type(exc).__name__)
    return error_response("store_unavailable", "the job store cannot be reached; try again shortly", 503)


def _unexpected_error(exc: Exception):
    log.exception("unhandled error")  # the traceback goes to the log, never to the client
    return error_response("internal_error", "internal server error", 500)
