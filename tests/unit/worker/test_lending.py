"""The lender of the preprocessing pool's processes: waiting threads get them in the lanes' order."""

from __future__ import annotations

import threading
import time

import pytest

from worker.lending import Lender, LenderClosed


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def waiting_threads(lender: Lender, tokens: list[int]) -> tuple[list[threading.Thread], list]:
    """One thread per entry, each taking a thing for a job of that many tokens, queued in this order; the list
    they append (tokens, thing) to as they get one."""
    got, threads = [], []
    for n in tokens:
        thread = threading.Thread(target=lambda n=n: got.append((n, lender.take(n))), daemon=True)
        thread.start()
        threads.append(thread)
        count = len(threads)
        wait_for(lambda count=count: len(lender.waiting) == count)  # queued before the next one
    return threads, got


def test_a_free_thing_is_lent_at_once_and_a_given_one_goes_back_to_the_free():
    lender = Lender(["a"])
    assert lender.take(100) == "a"
    lender.give("a")
    assert lender.take(5) == "a" and not lender.waiting


def test_waiters_get_things_from_the_short_lane_and_the_oldest_lane_in_turn():
    lender = Lender()
    threads, got = waiting_threads(lender, [500, 400, 16, 300, 32])
    for i in range(5):
        lender.give(i)
        wait_for(lambda i=i: len(got) == i + 1)
    for thread in threads:
        thread.join(5)
    # short: 16; oldest: 500; short: 32; oldest: 400; short: 300 -- each thread got the thing given at its turn
    assert got == [(16, 0), (500, 1), (32, 2), (400, 3), (300, 4)]


def test_close_wakes_every_waiter_and_refuses_later_takes():
    lender = Lender()
    failures = []

    def take():
        try:
            lender.take(10)
        except LenderClosed:
            failures.append(True)

    threads = [threading.Thread(target=take, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(lender.waiting) == 3)
    lender.close()
    for thread in threads:
        thread.join(5)
    assert failures == [True] * 3
    with pytest.raises(LenderClosed):
        lender.take(10)
