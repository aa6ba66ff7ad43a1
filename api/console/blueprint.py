"""The console's blueprint: its security headers, its error pages, and how a page is rendered."""

from __future__ import annotations

from types import SimpleNamespace

from flask import Blueprint, Response, g, render_template, request
from werkzeug.exceptions import HTTPException

from api.errors import HTTP_CODES
from shared.errors import VisionqError

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static",
               static_url_path="/static")

# No inline script or style anywhere (the result text is model output: attacker-controlled); forms post only here.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)  # the image route sets a stricter one
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"  # pages show a key's private jobs
    return response


@bp.errorhandler(VisionqError)
def error_page(exc: VisionqError):
    """A refused console request: an HTML page with the same stable code the JSON API would give."""
    return page("error.html", error=exc), exc.http_status, exc.headers


@bp.errorhandler(HTTPException)
def http_error_page(exc: HTTPException):
    """Werkzeug's own refusals (a form over the body limit, a bad form) as a page too, not the API's JSON."""
    status = exc.code or 500
    if status < 400:
        return exc
    error = SimpleNamespace(code=HTTP_CODES.get(status, f"http_{status}"), message=exc.description or exc.name)
    return page("error.html", error=error), status


def page(template: str, **context) -> str:
    """Render a console page with the signed-in key and its CSRF token (forms carry it)."""
    session = g.get("console")
    return render_template(template, key=g.get("key") if session else None,
                           csrf_token=session.csrf if session else g.get("pre_csrf", ""), **context)
