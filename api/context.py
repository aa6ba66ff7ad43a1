"""Where request handlers get the settings and the job store: one of each per process."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from shared.config import Settings
from shared.store import JobStore, connect


@dataclass
class Services:
    settings: Settings
    store: JobStore


def init_app(app: Flask, settings: Settings) -> None:
    """Create the process's Redis client and job store."""
    app.extensions["visionq"] = Services(settings, JobStore(connect(settings), settings.result_ttl_s))


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["visionq"]
