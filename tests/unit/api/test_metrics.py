"""The API's request metrics (api/metrics.py): every request counted once under its route pattern and status, and
timed, through the series each process looks up once."""

from __future__ import annotations

from prometheus_client import REGISTRY

from api import create_app
from shared.config import Settings


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_request_is_counted_and_timed_once_under_its_route_and_status():
    app = create_app(Settings(redis_url="redis://127.0.0.1:9"))  # these routes never reach Redis
    client = app.test_client()
    before = {status: sample("visionq_api_requests_total", method="GET", route="unmatched", status=status)
              for status in ("404", "405")}
    timed = sample("visionq_api_request_seconds_count", method="GET", route="unmatched")
    spec = sample("visionq_api_requests_total", method="GET", route="/openapi.json", status="200")
    for _ in range(3):
        assert client.get("/no/such/route").status_code == 404
    assert client.get("/v1/jobs/some-id/cancel").status_code == 405  # a POST route: same method and route, 405
    assert client.get("/openapi.json").status_code == 200
    assert sample("visionq_api_requests_total", method="GET", route="unmatched", status="404") == before["404"] + 3
    assert sample("visionq_api_requests_total", method="GET", route="unmatched", status="405") == before["405"] + 1
    assert sample("visionq_api_request_seconds_count", method="GET", route="unmatched") == timed + 4
    assert sample("visionq_api_requests_total", method="GET", route="/openapi.json", status="200") == spec + 1
