"""The Redis client every visionq process uses: one primary at a URL, or the primary a set of sentinels names.

Sentinel: VISIONQ_REDIS_URL=sentinel://host1:26379;sentinel://host2:26379 (kombu's syntax) makes every visionq
client ask the sentinels for the current primary of VISIONQ_REDIS_SENTINEL_MASTER, and ask again after a failover.
Celery's broker connection reads the same URL (kombu's sentinel transport).
"""

from __future__ import annotations

from urllib.parse import urlparse

import redis
from redis.sentinel import Sentinel

from shared.config import Settings

SENTINEL_SCHEME = "sentinel://"


def connect(settings: Settings, decode_responses: bool = True) -> redis.Redis:
    """A client of the primary (strings in, strings out; bytes for uploads). A GPU worker runs 2 x max_batch task
    threads, each holding a connection now and then: redis-py's default pool stops at 100."""
    options = {"decode_responses": decode_responses, "health_check_interval": 30,
               "max_connections": max(100, 2 * settings.max_batch + 32)}
    if is_sentinel_url(settings.broker_url):
        return primary_client(settings.broker_url, settings.redis_sentinel_master, **options)
    return redis.Redis.from_url(settings.broker_url, **options)


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


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
