"""The token bucket: a burst, then the time until the next request may go ahead."""

from __future__ import annotations

import time


def test_token_bucket_allows_the_burst_then_says_how_long_to_wait(store):
    from shared.store.rates import Charge, RateLimiter

    charge = Charge(f"bucket-{time.time_ns()}", rate_per_s=10, burst=3)
    rates = RateLimiter(store.redis)
    assert [rates.take(charge) for _ in range(3)] == [0, 0, 0]
    wait = rates.take(charge)
    assert 0 < wait <= 0.1 + 0.01  # one token comes back every 1/rate seconds
    time.sleep(wait + 0.01)
    assert rates.take(charge) == 0
