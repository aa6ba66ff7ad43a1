"""The webhook model: signatures that the standardwebhooks package verifies, the retry schedule, which answers
are retried, and the checks of a webhook at submit time."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from shared.config import Settings
from shared.errors import InvalidWebhookEvents, WebhookUrlRefused
from shared.jobs import WebhookSpec
from shared.outbound.netguard import ForbiddenAddress, UrlRefused, check_url
from shared.webhooks.events import EVENTS, new_secret, payload, signed_headers
from shared.webhooks.retries import backoff_s, retry_after_s, retryable
from shared.webhooks.targets import check_webhook, webhook_guard


def test_signed_headers_verify_with_the_standardwebhooks_package():
    secret, body = new_secret(), payload({"id": "j1", "status": "failed", "finished_at": "2026-01-01T00:00:00Z"})
    headers = signed_headers(secret, "msg_j1", body)
    assert Webhook(secret).verify(body, headers) == {"type": "job.failed", "timestamp": "2026-01-01T00:00:00Z",
                                                    "data": {"id": "j1", "status": "failed",
                                                             "finished_at": "2026-01-01T00:00:00Z"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)  # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("failed", "succeeded"), headers)  # another body


def test_a_signature_older_than_five_minutes_is_refused_by_receivers():
    secret, body = new_secret(), payload({"status": "canceled"})
    stale = signed_headers(secret, "msg_x", body, now=datetime.now(UTC) - timedelta(minutes=6))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)  # so every attempt is signed anew


def test_backoff_doubles_to_its_cap_with_jitter():
    rng = random.Random(7)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (8, 300), (50, 300)]:
        delays = [backoff_s(attempt, 5, 300, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # spread, not one value


def test_retry_after_in_seconds_or_as_a_date():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_s("120") == 120
    assert retry_after_s("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30
    assert retry_after_s("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


@pytest.mark.parametrize(("status", "again"), [(None, True), (500, True), (503, True), (429, True), (408, True),
                                               (400, False), (401, False), (404, False), (410, False),
                                               (301, False)])
def test_which_answers_are_retried(status, again):
    assert retryable(status) is again


def test_a_webhook_gets_every_event_by_default_and_only_known_ones():
    settings = Settings(webhook_allow_http=True, webhook_allowed_networks=["127.0.0.0/8"])
    assert check_webhook(WebhookSpec(url="http://127.0.0.1:9/"), settings).events == list(EVENTS)
    for events in ([], ["job.exploded"], ["job.failed", "job.failed"]):
        with pytest.raises(InvalidWebhookEvents):
            check_webhook(WebhookSpec(url="http://127.0.0.1:9/", events=events), settings)


@pytest.mark.parametrize("url", ["https://127.0.0.1/", "http://example.com/", "https://169.254.169.254/latest",
                                 "https://user:pw@example.com/", "ftp://example.com/", "https://0x7f.1/",
                                 "https://" + "a" * 3000 + ".com/"])
def test_the_ssrf_guard_refuses_webhook_urls_by_default(url):
    with pytest.raises(WebhookUrlRefused):
        check_webhook(WebhookSpec(url=url), Settings())


def test_image_and_webhook_allowances_are_separate():
    """The development recipe (webhook allowances only) lets webhooks reach loopback, never image URLs; and
    image allowances open no webhook target."""
    recipe = Settings(webhook_allow_http=True, webhook_allowed_networks=["127.0.0.0/8"])
    check_webhook(WebhookSpec(url="http://127.0.0.1:9000/"), recipe)
    check_url("https://127.0.0.1:9000/", webhook_guard(recipe))
    with pytest.raises(UrlRefused, match="scheme"):
        check_url("http://127.0.0.1:9000/a.png", recipe)
    with pytest.raises(ForbiddenAddress):
        check_url("https://127.0.0.1:9000/a.png", recipe)
    images_open = Settings(allow_http=True, url_allowed_networks=["127.0.0.0/8"])
    check_url("http://127.0.0.1:9000/a.png", images_open)
    for url in ("http://127.0.0.1:9000/", "https://127.0.0.1:9000/"):
        with pytest.raises(WebhookUrlRefused):
            check_webhook(WebhookSpec(url=url), images_open)


def test_the_delivery_worker_imports_no_torch():
    code = ("import sys, shared.webhooks.delivery_app; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers'} or m in {'worker.engine', 'worker.celery_app'}); print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
