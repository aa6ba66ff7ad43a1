"""When a failed delivery is tried again: which answers are worth a retry, and the backoff between attempts."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def retryable(status_code: int | None) -> bool:
    """Whether an answer is worth trying again: no answer at all, 5xx, 429, and 408 (the receiver itself says
    it timed out waiting for us). Other 4xx mean the receiver refuses this request and will again; a redirect
    is not followed (a webhook URL should be the final one) and is not retried either."""
    return status_code is None or status_code >= 500 or status_code in (408, 429)


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The wait after the `attempt`-th failure: base * 2^(attempt-1), capped at max, with jitter (half of it
    random) so that receivers coming back are not hit by every sender at once."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """The seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
