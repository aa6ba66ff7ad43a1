"""The HTTP API: validate, write the job, enqueue, answer. It never imports torch or the worker."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings, get_settings
from shared.images.decode import configure_pillow


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask app factory; tests pass their own settings."""
    from api import batches, console, deliveries, errors, health, jobs, metrics, openapi, queues, uploads, webhooks
    from api.context import init_app
    from api.fast_poll import FastPoll

    settings = settings or get_settings()
    configure_pillow(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    init_app(app, settings)
    errors.register(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(queues.bp)
    app.register_blueprint(uploads.bp)
    app.register_blueprint(deliveries.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    console.register(app)
    metrics.init_app(app)
    app.wsgi_app = FastPoll(app)
    return app
