"""`visionq webhooks listen`: a local receiver for developing against visionq's webhooks. It verifies each
event's Standard Webhooks signature with the `standardwebhooks` package (the way a real receiver should),
prints it, remembers every request, and answers 204 (or 401 when the signature does not verify).

Point a job at it with `"webhook": {"url": "http://127.0.0.1:<port>/"}` on a server that allows it
(VISIONQ_WEBHOOK_ALLOW_HTTP=true, VISIONQ_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]'); the tests' receiver is this
class.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass
class Received:
    """One request as the receiver saw it."""

    headers: dict[str, str]
    body: bytes
    verified: bool | None  # None when no secret was given
    answered: int = 0
    event: dict | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WebhookReceiver

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY_BYTES)
        received = self.server.receive({k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
        status, headers = self.server.answer(received)
        received.answered = status
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sender gave up waiting (what the slow-receiver tests provoke)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


class WebhookReceiver(ThreadingHTTPServer):
    """Receives webhooks on host:port in a thread of its own; `received` holds every request in order."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: str | None = None,
                 on_event: Callable[[Received], None] | None = None):
        super().__init__((host, port), _Handler)
        self.verifier = Webhook(secret) if secret else None
        self.on_event = on_event
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def receive(self, headers: dict[str, str], body: bytes) -> Received:
        received = Received(headers, body, self.verify(headers, body))
        if received.verified is not False:
            received.event = json.loads(body) if body else None
        with self.lock:
            self.received.append(received)
        if self.on_event:
            self.on_event(received)
        return received

    def verify(self, headers: dict[str, str], body: bytes) -> bool | None:
        if self.verifier is None:
            return None
        try:
            self.verifier.verify(body.decode(), headers)
        except Exception:  # the library raises its own error, and ValueError on malformed headers
            return False
        return True

    def answer(self, received: Received) -> tuple[int, dict[str, str]]:
        """The status and headers to answer with (subclasses in the tests misbehave on purpose)."""
        return (401 if received.verified is False else 204), {}

    def start(self) -> WebhookReceiver:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="webhook-receiver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def print_event(received: Received) -> None:
    """How `visionq webhooks listen` shows an event."""
    mark = {True: "verified", False: "SIGNATURE DOES NOT VERIFY", None: "not verified (no --secret)"}
    print(f"--- {received.webhook_id} ({mark[received.verified]})", flush=True)
    if received.event is not None:
        print(json.dumps(received.event, indent=2), flush=True)


def listen(host: str, port: int, secret: str | None) -> int:
    """Serve until interrupted."""
    with WebhookReceiver(host, port, secret, on_event=print_event) as receiver:
        print(f"listening for webhooks on {receiver.url} (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
