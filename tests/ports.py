"""Ports for servers the tests start where one free port is not enough."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def ephemeral_low() -> int:
    """The lowest port the kernel gives to outgoing connections (and to bind(0))."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports, below the ephemeral range.

    Workers of one host serve metrics on port, port + 1, ...: `free_port()` checks only the first, and one above it
    in the ephemeral range may be any outgoing connection's local port by the time a worker binds it (a full run
    holds hundreds), which makes that worker exit at start again and again.
    """
    low = ephemeral_low()
    for _ in range(500):
        base = random.randrange(low // 2, low - count)
        if all(bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {low}")
