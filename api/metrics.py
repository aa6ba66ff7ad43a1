"""GET /metrics for Prometheus: requests and latencies of the API, and, read from Redis at each scrape, the depth
of every model's queue, jobs by status and live workers.

Under gunicorn the request metrics are summed over its worker processes (api/gunicorn_conf.py). /metrics needs no
API key: serve it on a private network, or keep it from the public ingress.
"""

from __future__ import annotations

import os
import time

import redis
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from api.context import services
from api.health import LIVE_WITHIN_S
from shared.jobs import TERMINAL, JobStatus
from shared.routing import queue_for

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("visionq_api_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram("visionq_api_request_seconds", "Time to answer a request", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def init_app(app: Flask) -> None:
    """Time and count every request of the app."""
    app.before_request(_start_clock)
    app.after_request(_count)
    app.register_blueprint(bp)


def _start_clock() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    started = g.get("metrics_started")
    # The route pattern, not the path, so that job ids do not make a series each.
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    record(request.method, route, response.status_code, started)
    return response


def record(method: str, route: str, status: int, started: float | None) -> None:
    """Count a request answered, and time it from `started` (time.perf_counter()) when known."""
    counter, latency = _series(method, route, status)
    counter.inc()
    if started is not None:
        latency.observe(time.perf_counter() - started)


_children: dict[tuple[str, str, int], tuple] = {}


def _series(method: str, route: str, status: int) -> tuple:
    """The request counter and latency histogram of these labels. prometheus-client's `labels()` checks and joins
    the labels and takes a lock on every call, ~5 us each, twice a request: the series are few (methods x route
    patterns x statuses), so each is looked up once per process."""
    pair = _children.get((method, route, status))
    if pair is None:
        pair = _children[(method, route, status)] = (REQUESTS.labels(method, route, str(status)),
                                                     LATENCY.labels(method, route))
    return pair


@bp.get("/metrics")
def metrics():
    """The metrics in Prometheus's text format."""
    body = generate_latest(request_registry()) + generate_latest(store_registry())
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def request_registry() -> CollectorRegistry:
    """This process's request metrics, or every gunicorn worker's summed when running under gunicorn."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def store_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector())
    return registry


class StoreCollector:
    """Queue depths, jobs by status and live workers, read from Redis when Prometheus scrapes."""

    def collect(self):
        svc = services()
        up = GaugeMetricFamily("visionq_store_up", "Whether Redis answered this scrape")
        try:
            depths = svc.queues.depth([queue_for(svc.settings, model) for model in svc.settings.served_models])
            counts = svc.store.status_counts()
            workers = svc.workers.live(LIVE_WITHIN_S)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._queues(depths, svc.settings.served_models)
        yield from self._jobs(counts)
        alive = GaugeMetricFamily("visionq_workers_alive", f"Workers that beat in the last {LIVE_WITHIN_S:g} s")
        alive.add_metric([], len(workers))
        yield alive

    @staticmethod
    def _queues(depths: dict[str, int], models: list[str]):
        family = GaugeMetricFamily("visionq_queue_depth", "Jobs queued for each model: on its Celery list or "
                                   "waiting for it in their keys' lines (the autoscaler's backlog)",
                                   labels=["queue", "model"])
        for (queue, depth), model in zip(depths.items(), models, strict=True):
            family.add_metric([queue, model], depth)
        yield family

    @staticmethod
    def _jobs(counts: dict[str, int]):
        live = GaugeMetricFamily("visionq_jobs", "Jobs queued or running now", labels=["status"])
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            live.add_metric([status.value], max(counts.get(status.value, 0), 0))
        ended = CounterMetricFamily("visionq_jobs_ended", "Jobs that ended, by terminal status", labels=["status"])
        for status in sorted(TERMINAL):
            ended.add_metric([status.value], counts.get(status.value, 0))
        yield live
        yield ended
