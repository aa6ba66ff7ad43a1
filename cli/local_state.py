"""The local stack's address book: `visionq up` writes where its API and Redis are, and its key, to
<data_dir>/local.json (readable by its owner only); the client commands read it when no flag or variable says
otherwise, and the next `up` reuses the key while it is still valid."""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "local.json"


def read_state(data_dir: Path) -> dict:
    """What the last `up` wrote here ({} when nothing, or something unreadable)."""
    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(data_dir: Path, *, api_url: str, redis_url: str, key: str) -> Path:
    """Record the running stack; the file holds a key, so only its owner may read it."""
    return _write(data_dir, {"api_url": api_url, "redis_url": redis_url, "key": key})


def remember_key(data_dir: Path, key: str) -> Path:
    """Keep the local key for the next `up` or demo (the demo's stack is gone when it ends: its address is not
    recorded, whatever an earlier `up` wrote stays)."""
    return _write(data_dir, {**read_state(data_dir), "key": key})


def _write(data_dir: Path, state: dict) -> Path:
    path = Path(data_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(state, out)
    return path
