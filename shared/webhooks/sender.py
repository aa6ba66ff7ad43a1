"""Sending one webhook delivery: claim it, sign the event, POST it through the SSRF guard, record the attempt.

A delivery never raises into anything: the job's outcome stands whatever the receiver does, and every way an
attempt can end (answer, network error, refusal, a bug here) is logged on the delivery and settled by the
store as delivered, retried later or failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

from shared.config import Settings
from shared.outbound.netguard import HostNotFound, UrlRefused
from shared.store.jobs import JobStore
from shared.webhooks.endpoints import attempt_entry
from shared.webhooks.events import payload, signed_headers
from shared.webhooks.retries import backoff_s, retry_after_s, retryable
from shared.webhooks.store import Claim, WebhookStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What one POST came to: the status code (None without one), an error for the log, and whether trying
    again could help."""

    status_code: int | None
    error: str | None
    retry: bool
    retry_after_s: float | None = None


@dataclass
class Sender:
    """Sends deliveries with one guarded HTTP client (thread-safe, shared by the worker's threads)."""

    settings: Settings
    jobs: JobStore
    hooks: WebhookStore
    client: httpx.Client

    def deliver(self, job_id: str, delivery_id: str) -> str | None:
        """Make one attempt at a delivery, if it is due and free; the outcome recorded, or None if skipped."""
        claim = self.hooks.claim(job_id, delivery_id, self.settings.webhook_lease_s)
        if claim is None:
            return None
        started = time.perf_counter()
        try:
            answer = self._attempt(claim)
        except Exception:  # a bug must not leave the delivery held: it is logged and retried like a failure
            log.exception("webhook delivery %s/%s failed unexpectedly", job_id, delivery_id)
            answer = Answer(None, "internal error while sending", retry=True)
        latency_ms = (time.perf_counter() - started) * 1000
        outcome, delay = self._judge(claim.attempt - int(claim.fields.get("schedule_base", 0)), answer)
        entry = attempt_entry(claim.attempt, answer.status_code, latency_ms, answer.error)
        recorded = self.hooks.record(claim, entry, outcome, delay, self.settings.webhook_horizon_s,
                                     self.settings.webhook_max_log)
        log.info("webhook %s/%s attempt %d: %s (%s)", job_id, delivery_id, claim.attempt, recorded,
                 answer.status_code or answer.error)
        return recorded

    def _attempt(self, claim: Claim) -> Answer:
        body = self._body(claim)
        if body is None:
            return Answer(None, "the job expired before its event could be sent", retry=False)
        secret = self.hooks.signing_secret(claim.fields["owner"], claim.fields["endpoint_id"])
        if secret is None:
            return Answer(None, "the endpoint was deleted", retry=False)
        headers = signed_headers(secret, claim.fields["event_id"], body)
        return self._post(claim.fields["url"], headers, body)

    def _body(self, claim: Claim) -> str | None:
        """The event's body: as stored by the first attempt, else made from the job now (it has ended, so it
        no longer changes)."""
        if "payload" in claim.fields:
            return claim.fields["payload"]
        job = self.jobs.get(claim.job_id)
        if job is None:
            return None
        return self.hooks.keep_payload(claim, payload(job.public()))

    def _post(self, url: str, headers: dict[str, str], body: str) -> Answer:
        timeout = httpx.Timeout(self.settings.webhook_timeout_s)
        try:
            # Only the status line and headers are read; a redirect is an answer, not followed.
            with self.client.stream("POST", url, content=body.encode(), headers=headers, timeout=timeout,
                                    follow_redirects=False) as response:
                code = response.status_code
                if 200 <= code < 300:
                    return Answer(code, None, retry=False)
                return Answer(code, f"HTTP {code}", retryable(code), retry_after_s(response.headers.get("retry-after")))
        except HostNotFound as exc:
            return Answer(None, str(exc), retry=True)  # DNS may come back
        except UrlRefused as exc:
            return Answer(None, f"refused by the URL guard: {exc}", retry=False)
        except httpx.TimeoutException:
            return Answer(None, f"no answer within {self.settings.webhook_timeout_s:g} s", retry=True)
        except httpx.HTTPError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}"[:300], retry=True)

    def _judge(self, attempt: int, answer: Answer) -> tuple[str, float]:
        """(delivered | retry | failed, seconds before the next attempt), `attempt` counting from the start of
        the schedule; Retry-After is honoured when longer than the backoff (the store fails a retry that would
        land past the give-up horizon)."""
        if answer.status_code is not None and 200 <= answer.status_code < 300:
            return "delivered", 0.0
        if not answer.retry:
            return "failed", 0.0
        delay = backoff_s(attempt, self.settings.webhook_retry_base_s, self.settings.webhook_retry_max_s)
        return "retry", max(delay, answer.retry_after_s or 0.0)
