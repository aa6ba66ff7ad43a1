"""Who is using the console: sign-in with an API key, the sign-in's cookie, CSRF checks, sign-out.

The cookie holds a random session token, not the API key: the key is checked once, at sign-in, by the same key
cache as the JSON API's Bearer header, and the session (in Redis: shared/store/sessions.py) keeps only the key's
id and a CSRF token. So a copied cookie is no API key (it works on no /v1 route), sign-out and expiry end it in
every process at once, and no server-wide signing secret has to be configured and shared. The key's record is
read on every console request, so a revoked key's sign-in stops at its next page.

The cookie is HttpOnly, SameSite=Strict (a link from another site opens the sign-in page rather than carrying the
session: the console is an operator's tool, not a landing page) and Secure when the request came over https.
Every POST must carry the session's CSRF token (the sign-in form: a token doubled in a cookie of its own) and,
when the browser sends an Origin, come from this host."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from flask import Response, g, redirect, request, url_for

from api.auth import ANONYMOUS
from api.console.blueprint import bp, page
from api.context import services
from shared.errors import CsrfRejected, Unauthorized
from shared.keys import ApiKey
from shared.store.rates import Charge
from shared.store.sessions import ConsoleSession

COOKIE = "visionq_console"
PRE_COOKIE = "visionq_console_csrf"  # the sign-in form's CSRF token, before there is a session
PUBLIC = frozenset({"console.static", "console.sign_in", "console.sign_in_submit"})


@bp.before_request
def load_session():
    """Set g.key, g.charge and g.console from the cookie; send a browser without a live sign-in to sign in."""
    if request.endpoint in PUBLIC:
        return None
    token = request.cookies.get(COOKIE, "")
    session = services().sessions.get(token)
    key = session_key(session) if session else None
    if key is None:
        if request.path.endswith(".json"):
            raise Unauthorized("sign in to the console first")
        return redirect(url_for("console.sign_in"), code=303)
    settings = services().settings
    rate, burst, _ = key.limits(settings)
    g.key, g.console, g.charge = key, session, Charge(key.id, rate, burst)
    if request.method == "POST":
        check_form(session.csrf)
    return None


def session_key(session: ConsoleSession) -> ApiKey | None:
    """The signed-in key as its record says now (None once revoked)."""
    if not services().settings.auth_enabled:
        return ANONYMOUS
    key = services().key_cache.keys.get(session.key_id)
    return key if key is not None and not key.revoked else None


def check_form(expected: str) -> None:
    """The POST came from a console page of this session: same-host Origin (when sent) and the CSRF token."""
    origin = request.headers.get("Origin")
    # The host alone: behind a TLS-terminating proxy the scheme this process sees is not the browser's.
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise CsrfRejected("the form was sent from another site")
    sent = request.form.get("csrf_token", "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRejected("the form's token is missing or stale: reload the page and send it again")


@bp.get("/sign-in")
def sign_in(error: str | None = None, status: int = 200):
    """The sign-in form, with a fresh CSRF token doubled in a cookie."""
    g.pre_csrf = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)
    response = Response(page("sign_in.html", error=error), status=status)
    set_cookie(response, PRE_COOKIE, g.pre_csrf, max_age=3600)
    return response


@bp.post("/sign-in")
def sign_in_submit():
    """Check the key with the API's key cache; on success a new session and its cookie."""
    check_form(request.cookies.get(PRE_COOKIE, ""))
    settings = services().settings
    secret = request.form.get("key", "").strip()
    key = services().key_cache.lookup(secret) if settings.auth_enabled and secret else None
    if key is None and settings.auth_enabled:
        return sign_in(error="This API key is unknown or revoked.", status=401)
    token, _ = services().sessions.start((key or ANONYMOUS).id)
    response = redirect(url_for("console.job_list"), code=303)
    set_cookie(response, COOKIE, token, max_age=settings.console_session_s)
    response.delete_cookie(PRE_COOKIE, path="/console")
    return response


@bp.post("/sign-out")
def sign_out():
    """End the session everywhere and drop its cookie."""
    services().sessions.end(request.cookies.get(COOKIE, ""))
    response = redirect(url_for("console.sign_in"), code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="Strict",
                        secure=request.is_secure)
