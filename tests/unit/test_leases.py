"""A worker's lease renewal moves only the delivery times of messages still unacknowledged."""

from __future__ import annotations

import time
import uuid

from shared.store.broker import Broker
from shared.store.keys import KOMBU_UNACKED_INDEX as UNACKED_INDEX


def test_renew_moves_held_messages_to_now_and_adds_nothing(store):
    held, acked = f"test-{uuid.uuid4()}", f"test-{uuid.uuid4()}"
    store.redis.zadd(UNACKED_INDEX, {held: time.time() - 50})
    try:
        assert Broker(store.redis).renew_leases([held, acked]) == 1
        assert store.redis.zscore(UNACKED_INDEX, held) > time.time() - 5
        assert store.redis.zscore(UNACKED_INDEX, acked) is None  # acknowledged meanwhile: not brought back
        assert Broker(store.redis).renew_leases([]) == 0
    finally:
        store.redis.zrem(UNACKED_INDEX, held)
