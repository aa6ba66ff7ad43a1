"""Where request handlers get the settings and the job store: one of each per process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app

from api.job_cache import FinishedJobs
from shared.config import Settings
from shared.store import JobStore, KeyStore, connect
from shared.uploads import UploadStore
from shared.webhook_store import WebhookStore

if TYPE_CHECKING:
    from api.auth import KeyCache


@dataclass
class Services:
    settings: Settings
    store: JobStore
    key_cache: KeyCache
    finished: FinishedJobs
    uploads: UploadStore
    hooks: WebhookStore


def init_app(app: Flask, settings: Settings) -> None:
    """Create the process's Redis clients, job store, key cache, upload store and webhook store."""
    from api.auth import KeyCache

    client = connect(settings)
    store = JobStore(client, settings.result_ttl_s, settings.idempotency_ttl_s, settings.webhook_queue)
    app.extensions["visionq"] = Services(settings, store, KeyCache(KeyStore(client), settings.key_cache_s),
                                         FinishedJobs(settings.result_ttl_s), UploadStore(settings),
                                         WebhookStore(client, settings.webhook_queue))


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["visionq"]
