"""The Lua scripts behind every multi-key change, so that each one is atomic in Redis (their source is in lua/).

A script's first line may name the fragments it uses (`-- requires: now, fill`): local functions defined in
files of their own, prepended once each, in order, so that the script Redis runs is one self-contained chunk.
Scripts receive every key they touch, or a template for it, from shared/store/keys.py.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import redis
from redis.commands.core import Script

LUA = Path(__file__).with_name("lua")
REQUIRES = "-- requires:"


@cache
def source(name: str) -> str:
    """The whole source of script `name`: its fragments first, then its own body."""
    return "\n".join(_chunks(name, []))


def _chunks(name: str, seen: list[str]) -> list[str]:
    text = (LUA / f"{name}.lua").read_text()
    first = text.splitlines()[0] if text else ""
    chunks = []
    if first.startswith(REQUIRES):
        for needed in (part.strip() for part in first[len(REQUIRES):].split(",")):
            if needed not in seen:
                seen.append(needed)
                chunks.extend(_chunks(needed, seen))
    chunks.append(text)
    return chunks


def register(client: redis.Redis, name: str) -> Script:
    """Script `name` bound to `client` (sent by its SHA, loaded on the first call that finds it missing)."""
    return client.register_script(source(name))
