"""Structured logs: one JSON object per line, carrying the job id of the job being handled (and the worker).

A log line names its job either explicitly (`log.info(..., extra={"job_id": ...})`) or through `job_context`,
which the worker enters around each task, so that every line a job causes can be found by its id.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_job_id: ContextVar[str | None] = ContextVar("visionq_job_id", default=None)
_fields: dict[str, str] = {}  # added to every line of this process (worker name, role)

# LogRecord attributes that are not the caller's `extra` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: time, level, logger, message, job id, process fields and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields,
        }
        job_id = _job_id.get()
        if job_id is not None:
            entry["job_id"] = job_id
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str | int, fmt: str = "json") -> None:
    """Send this process's logs to stderr, as JSON lines or as plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def bind(**fields: str) -> None:
    """Add fields to every later line of this process (e.g. the worker's name)."""
    _fields.update(fields)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Lines logged inside carry this job id."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def enter_job(job_id: str | None) -> object:
    """Start tagging lines with this job id (for hooks that cannot use a with block); returns a token."""
    return _job_id.set(job_id)


def leave_job(token: object) -> None:
    """Stop tagging lines with the job id set by the matching enter_job."""
    _job_id.reset(token)
