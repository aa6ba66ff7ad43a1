"""The tests' webhook receiver: `visionq webhooks listen`'s server, told to misbehave on cue (fail N times,
answer slowly, hold a request until released); a test makes it "down" by stopping it and later starts a new
one on the same port."""

from __future__ import annotations

import threading
import time

from cli.webhook_listener import Received, WebhookReceiver


class ScriptedReceiver(WebhookReceiver):
    """Answers from a script first (status, headers, delay), then 204; records every request."""

    def __init__(self, port: int = 0):
        super().__init__("127.0.0.1", port)
        self.script: list[tuple[int, dict[str, str], float]] = []
        self.arrived = threading.Condition()
        self.release = threading.Event()
        self.release.set()  # clear() to hold every request until set() again

    def fail(self, *statuses: int, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> ScriptedReceiver:
        """The next requests are answered with these statuses, in order."""
        self.script.extend((status, headers or {}, delay_s) for status in statuses)
        return self

    def receive(self, headers: dict[str, str], body: bytes) -> Received:
        received = super().receive(headers, body)
        with self.arrived:
            self.arrived.notify_all()
        return received

    def answer(self, received: Received) -> tuple[int, dict[str, str]]:
        with self.lock:
            status, headers, delay_s = self.script.pop(0) if self.script else (204, {}, 0.0)
        self.release.wait(30)
        time.sleep(delay_s)
        return status, headers

    def wait_for(self, count: int, timeout_s: float = 30) -> list[Received]:
        """Every request once there are at least `count`."""
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(self.received)} requests arrived, expected {count}"
                self.arrived.wait(remaining)
        return list(self.received)
