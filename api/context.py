"""Where request handlers get the settings and the stores: one of each per process, made by the app factory."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from api.job_cache import FinishedJobs
from api.key_cache import KeyCache
from shared.config import Settings
from shared.images.uploads import UploadStore
from shared.routing import webhook_queue
from shared.store.api_keys import KeyStore
from shared.store.batches import BatchStore
from shared.store.broker import Broker
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.queues import Queues
from shared.store.rates import RateLimiter
from shared.store.sessions import ConsoleSessions
from shared.store.workers import WorkerRegistry
from shared.webhooks.store import WebhookStore


@dataclass
class Services:
    settings: Settings
    store: JobStore
    rates: RateLimiter
    workers: WorkerRegistry
    broker: Broker
    key_cache: KeyCache
    finished: FinishedJobs
    uploads: UploadStore
    hooks: WebhookStore
    batches: BatchStore
    queues: Queues
    sessions: ConsoleSessions


def init_app(app: Flask, settings: Settings) -> None:
    """Create the process's Redis clients (strings, and bytes for uploads) and every store on them, the key cache,
    the finished-job cache and the console's sign-ins."""
    client, binary = connect(settings), connect(settings, decode_responses=False)
    app.extensions["visionq"] = Services(
        settings=settings, store=JobStore.from_settings(client, settings), rates=RateLimiter(client),
        workers=WorkerRegistry(client), broker=Broker(client),
        key_cache=KeyCache(KeyStore(client), settings.key_cache_s), finished=FinishedJobs(settings.result_ttl_s),
        uploads=UploadStore(settings, binary), hooks=WebhookStore(client, webhook_queue(settings)),
        batches=BatchStore.from_settings(client, binary, settings), queues=Queues(client, settings.broker_window),
        sessions=ConsoleSessions(client, settings.console_session_s))


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["visionq"]
