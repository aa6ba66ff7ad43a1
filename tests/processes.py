"""Whether processes the tests started (or their children) are still running."""

from __future__ import annotations

import time


def alive(pid: int) -> bool:
    """Running (an exited orphan may stay a zombie where PID 1 does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 10) -> list[int]:
    """Wait until none of the processes runs; those still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]
