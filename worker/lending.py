"""A few reusable things (the preprocessing pool's idle processes) lent to waiting threads in the lanes' order.

A burst of jobs reaches the worker at once, and its task threads all wait for one of a few preprocessing
processes; in arrival order, the burst's short jobs would reach the GPU thread no sooner than its long ones, and
its short lane (worker/batcher.py) would have few to choose from. So the same two lanes take turns here: the
waiting thread whose job makes the fewest new tokens (ties: the earlier), then the one that has waited longest.
A thread waits for at most two lendings per thread that was waiting before it, plus one.

Each waiter sleeps on an event of its own: a returned thing wakes the one thread it goes to, not every waiter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Thing = TypeVar("Thing")


class LenderClosed(Exception):
    """The lender was closed while a thread waited (or before it asked)."""


@dataclass
class _Waiter(Generic[Thing]):
    tokens: int
    woken: threading.Event = field(default_factory=threading.Event)
    thing: Thing | None = None


class Lender(Generic[Thing]):
    def __init__(self, things: list[Thing] = ()):
        self.lock = threading.Lock()
        self.free: list[Thing] = list(things)
        self.waiting: list[_Waiter[Thing]] = []  # in arrival order
        self.short_turn = True
        self.closed = False

    def take(self, tokens: int) -> Thing:
        """A free thing, waiting for one if need be; `tokens`: how many new tokens the caller's job makes."""
        with self.lock:
            if self.closed:
                raise LenderClosed()
            if self.free and not self.waiting:
                return self.free.pop()
            waiter = _Waiter(tokens)
            self.waiting.append(waiter)
        waiter.woken.wait()
        if waiter.thing is None:
            raise LenderClosed()
        return waiter.thing

    def give(self, thing: Thing) -> None:
        """Return a thing (or add one): to the next waiter in the lanes' order, else to the free ones."""
        with self.lock:
            if self.closed or not self.waiting:
                self.free.append(thing)
                return
            if self.short_turn:
                waiter = min(self.waiting, key=lambda w: w.tokens)  # the first of the fewest: ties by arrival
            else:
                waiter = self.waiting[0]
            self.short_turn = not self.short_turn
            self.waiting.remove(waiter)
            waiter.thing = thing
        waiter.woken.set()

    def close(self) -> None:
        """Wake every waiter with LenderClosed, and refuse later takes (things given back still go to `free`)."""
        with self.lock:
            self.closed, waiting, self.waiting = True, self.waiting, []
        for waiter in waiting:
            waiter.woken.set()
