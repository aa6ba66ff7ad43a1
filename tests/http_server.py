"""A real HTTP server for the tests of outbound fetches: it serves what a test registers at a path (bytes with a
content type, redirects, slow or endless bodies).

It listens on 127.0.0.5, a loopback address of its own, and stands for a public server: tests allow exactly that
address (url_allowed_networks=["127.0.0.5/32"]), so a redirect from it to 127.0.0.1 is still refused."""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What one path answers."""

    body: bytes = b""
    content_type: str = "image/png"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunk: int = 0  # >0: send the body in chunks of this size, without a Content-Length
    delay_s: float = 0.0  # before each chunk
    repeat: int = 1  # the body is sent this many times (an endless-looking body from a small one)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHttpServer

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (a bound or timeout was hit): what these tests provoke

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(b"no such path", "text/plain", 404)
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        for name, value in route.headers.items():
            self.send_header(name, value)
        self._send_body(route)

    def _send_body(self, route: Route) -> None:
        if not route.chunk:
            self.send_header("Content-Length", str(len(route.body) * route.repeat))
            self.end_headers()
            for _ in range(route.repeat):
                self.wfile.write(route.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(route.repeat):
            for start in range(0, len(route.body), route.chunk):
                time.sleep(route.delay_s)
                piece = route.body[start:start + route.chunk]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


HOST = "127.0.0.5"
NETWORK = f"{HOST}/32"


class LocalHttpServer(ThreadingHTTPServer):
    """Started in a thread on a free port of `host`; `url(path)` is where a route is served."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str = HOST, tls: ssl.SSLContext | None = None):
        super().__init__((host, 0), _Handler)
        self.host = host
        self.scheme = "https" if tls else "http"
        if tls:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> LocalHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def add(self, path: str, route: Route) -> str:
        """Serve `route` at `path`; returns its URL."""
        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer `path` with a redirect to `location`; returns its URL."""
        return self.add(path, Route(b"", "text/plain", status, {"Location": location}))
