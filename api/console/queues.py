"""The console's queues and workers: depth per model (GET /v1/queues's figures), the live workers with their
device, batch sizes and counters, and the jobs/s of the last hour; /console/live.json gives the same for the
page's script (static/console.js) to poll."""

from __future__ import annotations

import time

from flask import g

from api.auth import charge_now
from api.console.blueprint import bp, page
from api.context import services
from api.health import LIVE_WITHIN_S
from shared.routing import queue_for

# What a worker publishes that the page shows (shared/store/workers.py; delivery and batch workers have fewer).
WORKER_FIELDS = ("model", "device", "dtype", "max_batch", "largest_batch", "peak_rows", "batches", "batched_jobs",
                 "jobs", "tokens", "gpu_peak_gib")


@bp.get("/queues")
def queues_page():
    charge_now()
    return page("queues.html", live=live_figures())


@bp.get("/live.json")
def live_json():
    charge_now()
    return live_figures()


def live_figures() -> dict:
    """Queues as GET /v1/queues shows them to this key, the live workers, and jobs/s per minute for an hour."""
    svc = services()
    queues = [queue_for(svc.settings, model) for model in svc.settings.served_models]
    per_minute = svc.queues.history(queues)
    return {
        "at": round(time.time(), 3),
        "queues": [{"model": model, **svc.queues.overview(queue, g.key.id)}
                   for model, queue in zip(svc.settings.served_models, queues, strict=True)],
        "workers": [worker_facts(name) for name in sorted(svc.workers.live(LIVE_WITHIN_S))],
        "jobs_per_s": [round(count / 60, 3) for count in per_minute],
    }


def worker_facts(name: str) -> dict:
    info = services().workers.info(name)
    facts = {"name": name, **{field: info[field] for field in WORKER_FIELDS if field in info}}
    if info.get("batches"):
        facts["mean_batch"] = round(int(info.get("batched_jobs", 0)) / int(info["batches"]), 2)
    return facts


def chart_points(series: list[float], width: int = 600, height: int = 120) -> str:
    """An SVG polyline's points for the series, scaled to the box (the highest value at the top)."""
    top = max(max(series, default=0), 0.001)
    step = width / max(len(series) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - value / top * height:.1f}" for i, value in enumerate(series))


@bp.app_template_filter("chart_points")
def _chart_points(series: list[float]) -> str:
    return chart_points(series)
