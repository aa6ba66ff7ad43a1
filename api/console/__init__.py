"""The web console at /console: server-rendered pages over the same stores and the same view code as the JSON
API, for the people who run the system and their users. One blueprint (blueprint.py); sign-in and CSRF
(signin.py); jobs, batches, queues and workers, and the admin's keys, a module each."""

from __future__ import annotations

from flask import Flask, redirect


def register(app: Flask) -> None:
    """Install the console's blueprint, and `/` redirecting to it."""
    from api.console import batches, jobs, keys, queues, signin  # noqa: F401  (their routes join the blueprint)
    from api.console.blueprint import bp

    app.register_blueprint(bp)
    app.add_url_rule("/", "console_root", lambda: redirect("/console/", code=302))
