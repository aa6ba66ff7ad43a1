"""Redis Sentinel: VISIONQ_REDIS_URL=sentinel://host1:26379;sentinel://host2:26379 (kombu's syntax) makes every
visionq client ask the sentinels for the current primary of VISIONQ_REDIS_SENTINEL_MASTER, and ask again after
a failover. Celery's broker connection reads the same URL (kombu's sentinel transport)."""

from __future__ import annotations

from urllib.parse import urlparse

import redis
from redis.sentinel import Sentinel

SCHEME = "sentinel://"


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEME)


def sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """The sentinels' (host, port) pairs, and the password and database (from the first URL) for the primary."""
    parts = [urlparse(part) for part in url.split(";") if part.strip()]
    addresses = [(part.hostname or "localhost", part.port or 26379) for part in parts]
    path = parts[0].path.strip("/")
    return addresses, parts[0].password, int(path) if path else 0


def primary_client(url: str, master: str, **kwargs) -> redis.Redis:
    """A client of the current primary that follows failovers."""
    addresses, password, db = sentinel_addresses(url)
    sentinels = Sentinel(addresses, sentinel_kwargs={"socket_timeout": 5})
    return sentinels.master_for(master, password=password, db=db, **kwargs)
