"""Batches for tests of the store and the batch worker's steps: real Redis, queues no worker reads."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from shared.batches.batch import BatchRequest, new_batch_id
from shared.batches.creator import Creator
from shared.batches.ending import Ending
from shared.batches.intake import accept
from shared.config import Settings
from shared.images.refs import Access
from shared.images.uploads import UploadStore
from shared.jobs import JobFailure, JobResult, Timings, TokenCounts
from shared.store.api_keys import KeyStore
from shared.store.batches import BatchStore, NewBatch
from shared.store.connection import connect
from shared.store.jobs import JobStore

UNCONSUMED_PREFIX = "unit-batches"  # the items' queues and the batch queue: no worker reads them
RESULT = JobResult(text="t", model="m", tokens=TokenCounts(prompt=1, completion=1),
                   timings=Timings(queue_ms=1, images_ms=1, inference_ms=1))
FAILURE = JobFailure(code="image_not_found", message="no such image")


@dataclass
class Stores:
    settings: Settings
    batches: BatchStore
    jobs: JobStore
    keys: KeyStore
    creator: Creator
    ending: Ending

    def submit(self, owner: str = "owner-a", idempotency: str | None = None, buckets: frozenset = frozenset(),
               **request) -> str:
        """A batch made as POST /v1/batches makes it; its id."""
        body = BatchRequest.model_validate(request)
        batch_id = new_batch_id()
        intake = accept(body, self.settings, Access(owner, buckets, self.creator.uploads), batch_id)
        created = self.batches.create(NewBatch(batch_id, owner, intake.spec, time.time()), idempotency,
                                      json.dumps(request, sort_keys=True), intake.upload_id, list(intake.chunks))
        assert created.outcome in ("created", "existing"), created
        return created.batch_id

    def run(self, batch_id: str, steps: int = 50) -> None:
        """Run the batch's steps as the batch worker would, until none is left to run now."""
        for _ in range(steps):
            self.creator.step(batch_id, "test")
            if not self.take_step(batch_id):
                return
        raise AssertionError("the batch's steps never stopped")

    def finish(self, batch_id: str) -> bool:
        """Run the batch's finish step, as the batch worker does once the last item has ended."""
        return self.ending.finish(batch_id, int(self.batches.state(batch_id)["attempt"]))

    def take_step(self, batch_id: str) -> bool:
        """Remove the batch's queued step messages; whether there was one."""
        found = False
        for raw in self.batches.redis.lrange(self.batches.queue, 0, -1):
            message = json.loads(raw)
            if message["headers"]["task"] == "visionq.batch_step" and batch_id in message["headers"]["argsrepr"]:
                self.batches.redis.lrem(self.batches.queue, 0, raw)
                found = True
        return found

    def tasks(self, batch_id: str) -> list[str]:
        """The batch queue's messages for this batch, by task name, oldest first."""
        messages = [json.loads(raw) for raw in reversed(self.batches.redis.lrange(self.batches.queue, 0, -1))]
        return [m["headers"]["task"] for m in messages if batch_id in m["headers"]["argsrepr"]]

    def results(self, batch_id: str) -> list[dict]:
        from shared.batches.results import result_lines

        return [json.loads(line) for line in result_lines(self.batches, batch_id)]

    def end_all(self, batch_id: str, fail: set[str] = frozenset()) -> None:
        """Run every queued item of the batch and end it (and every running one): failed when its custom_id is in
        `fail`."""
        for item in self.results(batch_id):
            if item["status"] in ("queued", "running"):
                self.jobs.mark_running(item["id"], "test-worker")
                if item["custom_id"] in fail:
                    self.jobs.mark_failed(item["id"], FAILURE)
                else:
                    self.jobs.mark_succeeded(item["id"], RESULT)


def make_stores(settings: Settings, **changes) -> Stores:
    settings = settings.model_copy(update={"queue": UNCONSUMED_PREFIX, **changes})
    client, binary = connect(settings), connect(settings, decode_responses=False)
    batches = BatchStore.from_settings(client, binary, settings)
    jobs = JobStore.from_settings(client, settings)
    keys = KeyStore(client)
    creator = Creator(settings, batches, jobs, keys, UploadStore(settings, binary))
    return Stores(settings, batches, jobs, keys, creator, Ending(settings, batches, jobs))


def lines(count: int, start: int = 0, **fields) -> list[dict]:
    return [{"custom_id": f"item-{i}", "images": ["bar_chart.png"], **fields} for i in range(start, start + count)]
