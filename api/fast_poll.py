"""GET /v1/jobs/<id>, the request clients repeat most, answered below Flask.

A poll's own work is small (the key from the key cache, one Redis round trip that charges the key's bucket and
reads the job with its place in the queue, its JSON), and Flask's request machinery (a request context, routing,
the hooks, a Response object) cost as much again. This WSGI middleware answers the plain poll itself: a GET of
/v1/jobs/<id> with no query string. It runs the view's own code (api.jobs.poll, api.auth.key_for), answers errors
with the app's one mapping (api.errors.error_payload) and counts the request under the route's own metrics series,
so a client cannot tell the two paths apart (tests/unit/api/test_fast_poll.py compares them). Everything else —
?wait, HEAD, other paths — goes to the Flask app.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flask import Flask

from api import metrics
from api.auth import ANONYMOUS, charge_of, key_for
from api.context import Services
from api.errors import error_payload
from api.jobs import poll

ENDPOINT = "jobs.get_job"


class FastPoll:
    """Wraps the Flask app's wsgi_app (`app.wsgi_app = FastPoll(app)`)."""

    def __init__(self, app: Flask):
        self.app, self.flask_wsgi = app, app.wsgi_app
        self.services: Services = app.extensions["visionq"]
        # The prefix comes from the app's own rule, so that the two paths cannot drift apart on it.
        (rule,) = [r for r in app.url_map.iter_rules() if r.endpoint == ENDPOINT]
        self.route = rule.rule
        self.prefix = self.route.removesuffix("<job_id>")
        if not self.prefix.endswith("/") or self.prefix + "<job_id>" != self.route:
            raise RuntimeError(f"{ENDPOINT}'s rule {self.route!r} is not <prefix>/<job_id>")

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if (environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING") or not path.startswith(self.prefix)
                or "/" in path[len(self.prefix):] or len(path) == len(self.prefix)):
            return self.flask_wsgi(environ, start_response)
        started = time.perf_counter()
        try:
            body = self.poll(environ, path[len(self.prefix):])
        except Exception as exc:  # noqa: BLE001 (every error gets the app's own answer, as under Flask)
            payload, status, headers = error_payload(exc)
            response = self.app.json.response(payload)  # jsonify's bytes, without an app context
            response.status_code = status
            response.headers.update(headers)
            metrics.record("GET", self.route, status, started)
            return response(environ, start_response)
        metrics.record("GET", self.route, 200, started)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def poll(self, environ: dict, job_id: str) -> bytes:
        svc = self.services
        key = key_for(environ.get("HTTP_AUTHORIZATION", ""), svc) if svc.settings.auth_enabled else ANONYMOUS
        return poll(svc, key, charge_of(key, svc.settings), job_id).encode()
