"""What a webhook may point at: the guard's allowances for webhook targets, and the API's check of a job's webhook
or a new endpoint before it is stored."""

from __future__ import annotations

from shared.config import Settings
from shared.errors import InvalidWebhookEvents, WebhookUrlRefused
from shared.jobs import WebhookSpec
from shared.outbound.netguard import UrlRefused, check_url
from shared.webhooks.events import EVENTS


def webhook_guard(settings: Settings) -> Settings:
    """The settings the SSRF guard applies to webhook targets: the image allowances (allow_http,
    url_allowed_networks) replaced by the webhook ones, so that opening image fetches to an internal network
    never lets webhooks reach it, and a loopback receiver allowed for development never exposes loopback to
    image URLs."""
    return settings.model_copy(update={"allow_http": settings.webhook_allow_http,
                                       "url_allowed_networks": settings.webhook_allowed_networks})


def check_webhook(spec: WebhookSpec, settings: Settings, allowed: tuple[str, ...] = EVENTS,
                  default: tuple[str, ...] | None = None) -> WebhookSpec:
    """The spec with its events spelled out (`default`, else every one `allowed`, when it names none), once its
    URL passes the SSRF guard (one DNS lookup) and its events are among `allowed`; else WebhookUrlRefused (400)
    or InvalidWebhookEvents (422)."""
    if len(spec.url) > settings.webhook_max_url_chars:
        raise WebhookUrlRefused(f"the webhook URL is longer than {settings.webhook_max_url_chars} characters")
    try:
        check_url(spec.url, webhook_guard(settings))
    except UrlRefused as exc:
        raise WebhookUrlRefused(f"webhook URL refused: {exc}") from None
    events = list(default or allowed) if spec.events is None else spec.events
    if not events or len(set(events)) != len(events) or not set(events) <= set(allowed):
        raise InvalidWebhookEvents(f"webhook events must be a non-empty list of distinct: {', '.join(allowed)}")
    return spec.model_copy(update={"events": events})
