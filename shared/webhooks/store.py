"""Webhooks in Redis: an API key's registered endpoints and signing secrets, and each job's deliveries (the outbox
the terminal transition writes, shared/store/lua/outbox.lua) with their schedule and attempt log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from shared.jobs import utcnow
from shared.store import scripts
from shared.store.broker import DELIVER_WEBHOOK_TASK, DISPATCH_WEBHOOKS_TASK, task_message
from shared.store.keys import (
    deliveries_key,
    delivery_key,
    delivery_log_key,
    endpoints_key,
    job_webhook_secret_key,
    webhooks_due_key,
)
from shared.webhooks.endpoints import Attempt, Delivery, Endpoint, new_endpoint_id
from shared.webhooks.events import new_secret


@dataclass(frozen=True)
class Claim:
    """A delivery taken for one attempt: its attempt number and its stored fields."""

    job_id: str
    delivery_id: str
    attempt: int
    fields: dict[str, str]


def member(job_id: str, delivery_id: str) -> str:
    """A delivery's entry in the due zset."""
    return f"{job_id} {delivery_id}"


def _time(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


class WebhookStore:
    """Endpoints, secrets and deliveries of the webhooks on one webhook queue."""

    def __init__(self, client: redis.Redis, webhook_queue: str):
        self.redis = client
        self.queue = webhook_queue
        self.due_key = webhooks_due_key(webhook_queue)
        self._take_due = scripts.register(client, "take_due")
        self._claim = scripts.register(client, "claim_delivery")
        self._record = scripts.register(client, "record_attempt")
        self._retry = scripts.register(client, "retry_delivery")
        self._add_endpoint = scripts.register(client, "add_endpoint")

    # --- endpoints and secrets ----------------------------------------------------------------------------

    def add_endpoint(self, owner: str, url: str, events: list[str], description: str | None,
                     max_endpoints: int) -> Endpoint | None:
        """Register an endpoint with a fresh secret; None when the owner already has `max_endpoints`."""
        endpoint = Endpoint(id=new_endpoint_id(), url=url, events=events, description=description,
                            created_at=utcnow(), secret=new_secret())
        added = self._add_endpoint(keys=[endpoints_key(owner)],
                                   args=[max_endpoints, endpoint.id, endpoint.model_dump_json()])
        return endpoint if added else None

    def endpoints(self, owner: str) -> list[Endpoint]:
        """The owner's endpoints, oldest first (secrets included: callers show them to no one)."""
        raws = self.redis.hvals(endpoints_key(owner))
        return sorted((Endpoint.model_validate_json(raw) for raw in raws), key=lambda e: e.created_at)

    def endpoint(self, owner: str, endpoint_id: str) -> Endpoint | None:
        raw = self.redis.hget(endpoints_key(owner), endpoint_id)
        return Endpoint.model_validate_json(raw) if raw else None

    def delete_endpoint(self, owner: str, endpoint_id: str) -> bool:
        """Remove an endpoint; its deliveries not yet made fail when their turn comes."""
        return bool(self.redis.hdel(endpoints_key(owner), endpoint_id))

    def job_secret(self, owner: str) -> str:
        """The secret that signs the events of the owner's jobs' own webhooks, made on first use."""
        key = job_webhook_secret_key(owner)
        self.redis.set(key, new_secret(), nx=True)
        return self.redis.get(key)

    def signing_secret(self, owner: str, endpoint_id: str) -> str | None:
        """The secret for a delivery: the owner's job secret, or the endpoint's (None once it is deleted)."""
        if not endpoint_id:
            return self.job_secret(owner)
        endpoint = self.endpoint(owner, endpoint_id)
        return endpoint.secret if endpoint else None

    # --- deliveries ---------------------------------------------------------------------------------------

    def deliveries(self, job_id: str) -> list[Delivery]:
        """Every delivery of the job's event, with its attempts, in the order they were made."""
        ids = self.redis.lrange(deliveries_key(job_id), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id in ids:
            pipe.hgetall(delivery_key(job_id, delivery_id))
            pipe.lrange(delivery_log_key(job_id, delivery_id), 0, -1)
        replies = pipe.execute()
        found = []
        for fields, log in zip(replies[::2], replies[1::2], strict=True):
            if fields:
                found.append(self._delivery(fields, log))
        return found

    def _delivery(self, fields: dict[str, str], log: list[str]) -> Delivery:
        pending = fields["status"] == "pending"
        return Delivery(id=fields["id"], event_id=fields["event_id"], type=fields["type"], url=fields["url"],
                        endpoint_id=fields["endpoint_id"] or None, status=fields["status"],
                        next_attempt_at=_time(fields["next_at"]) if pending else None,
                        attempts=[Attempt.model_validate_json(entry) for entry in log])

    def take_due(self, lease_s: float, limit: int = 100) -> list[tuple[str, str]]:
        """Deliveries whose time has come, each put off by `lease_s` so that the next poll skips it."""
        members = self._take_due(keys=[self.due_key], args=[limit, lease_s])
        return [tuple(m.split(" ", 1)) for m in members]

    def enqueue(self, deliveries: list[tuple[str, str]]) -> None:
        """Queue one send task per delivery."""
        if deliveries:
            messages = [task_message(DELIVER_WEBHOOK_TASK, [job_id, did], self.queue) for job_id, did in deliveries]
            self.redis.lpush(self.queue, *messages)

    def claim(self, job_id: str, delivery_id: str, lease_s: float) -> Claim | None:
        """Take the delivery for one attempt, or None when it is not pending, not due or held by another."""
        attempt, detail = self._claim(keys=[delivery_key(job_id, delivery_id), self.due_key],
                                      args=[member(job_id, delivery_id), lease_s])
        if not attempt:
            return None
        return Claim(job_id, delivery_id, int(attempt), dict(zip(detail[::2], detail[1::2], strict=True)))

    def keep_payload(self, claim: Claim, body: str) -> str:
        """Store the event's body on its first attempt (the job may expire before the last); the stored one."""
        key = delivery_key(claim.job_id, claim.delivery_id)
        self.redis.hsetnx(key, "payload", body)
        return self.redis.hget(key, "payload") or body

    def record(self, claim: Claim, attempt: Attempt, outcome: str, delay_s: float, horizon_s: float,
               max_log: int) -> str:
        """Log the attempt and settle the delivery: delivered, failed, or retried after `delay_s` (failed
        instead when that is past the give-up horizon). Returns the outcome recorded, or "stale"."""
        keys = [delivery_key(claim.job_id, claim.delivery_id), delivery_log_key(claim.job_id, claim.delivery_id),
                self.due_key]
        args = [member(claim.job_id, claim.delivery_id), claim.attempt, outcome, delay_s, horizon_s,
                attempt.model_dump_json(exclude={"outcome"}), max_log]
        return self._record(keys=keys, args=args)

    def retry(self, job_id: str, delivery_id: str, min_ttl_s: int) -> str:
        """Send a delivery again now, on a fresh schedule: "ok", "busy" (an attempt is under way) or "missing"."""
        keys = [delivery_key(job_id, delivery_id), delivery_log_key(job_id, delivery_id), self.due_key, self.queue]
        message = task_message(DISPATCH_WEBHOOKS_TASK, [], self.queue)
        return self._retry(keys=keys, args=[member(job_id, delivery_id), message, min_ttl_s])

