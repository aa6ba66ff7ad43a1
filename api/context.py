"""Where request handlers get the settings, the job store and the queue: one of each per process."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app

from shared.config import Settings
from shared.queue import make_celery
from shared.store import JobStore, connect


@dataclass
class Services:
    settings: Settings
    store: JobStore
    celery: Celery


def init_app(app: Flask, settings: Settings) -> None:
    """Create the process's Redis client, job store and Celery producer."""
    store = JobStore(connect(settings), settings.result_ttl_s)
    app.extensions["visionq"] = Services(settings, store, make_celery(settings))


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["visionq"]
