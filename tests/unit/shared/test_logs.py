"""Log lines are JSON objects that carry the job id, from the job context or from the call's extras."""

from __future__ import annotations

import json
import logging

from shared import logs


def record(message: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("visionq.test", logging.INFO, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


def test_a_line_is_json_with_the_job_id_of_the_context():
    with logs.job_context("job-1"):
        line = json.loads(logs.JsonFormatter().format(record("running %s")))
    assert line["job_id"] == "job-1" and line["level"] == "INFO" and line["logger"] == "visionq.test"
    assert "job_id" not in json.loads(logs.JsonFormatter().format(record("outside")))


def test_extras_and_process_fields_are_kept_and_exceptions_included(monkeypatch):
    monkeypatch.setattr(logs, "_fields", {})
    logs.bind(worker="gpu0@box")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record("failed", job_id="job-2", applied=True)
        rec.exc_info = sys.exc_info()
    line = json.loads(logs.JsonFormatter().format(rec))
    assert (line["job_id"], line["applied"], line["worker"]) == ("job-2", True, "gpu0@box")
    assert "ValueError: boom" in line["exc"]
