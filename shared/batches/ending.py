"""How a batch ends: the cancel step (stop its items still queued or running) and the finish step (once its last
item has ended: copy its results and errors to S3 when configured, keep its items as long as the batch, then set
its final status and write the webhook outbox of its end in one step, with the batch as it is then as the body)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.batches.batch import Batch, BatchStatus
from shared.batches.results import error_lines, item_job_ids, result_lines, write_s3
from shared.config import Settings
from shared.jobs import JobFailure, JobStatus
from shared.outbound.s3 import parse_s3_uri, s3_client
from shared.store.batches import BatchStore
from shared.store.jobs import JobStore
from shared.webhooks.events import batch_payload

log = logging.getLogger(__name__)

CANCELED = JobFailure(code="canceled", message="the batch was canceled")
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass
class Ending:
    """The cancel and finish steps against one Redis client's stores."""

    settings: Settings
    batches: BatchStore
    jobs: JobStore

    def cancel(self, batch_id: str) -> int:
        """Cancel the canceled batch's items still queued or running; how many. No item is admitted after the
        cancel (the create script refuses them), so the walk sees them all; the last one's end ends the batch."""
        self.batches.finish_input(batch_id)
        canceled = 0
        for job_ids in item_job_ids(self.batches, batch_id):
            statuses = self.batches.job_fields(job_ids, ("status",))
            for job_id, fields in zip(job_ids, statuses, strict=True):
                if fields["status"] in ACTIVE and self.jobs.mark_canceled(job_id, CANCELED).applied:
                    canceled += 1
        log.info("batch %s canceled: %d items stopped", batch_id, canceled)
        return canceled

    def finish(self, batch_id: str, attempt: int) -> bool:
        """Finish the batch's `attempt` once its last item has ended: False when it has not (or is another
        attempt now)."""
        state = self.batches.state(batch_id)
        if not state or state.get("attempt") != str(attempt) or state.get("ending") != str(attempt):
            return False
        if self.settings.results_s3_uri:
            self._copy_to_s3(batch_id)
        for job_ids in item_job_ids(self.batches, batch_id):
            self.batches.expire(batch_id, job_ids)
        self.batches.expire(batch_id, [])
        for _ in range(3):  # a cancel between the read and the write: read again
            if self._tell(batch_id, attempt) >= 0:
                self.batches.close(batch_id)
                return True
        return False

    def _tell(self, batch_id: str, attempt: int) -> int:
        """Set the final status and write the outbox, with the batch as it is then as the event's body."""
        batch = self.batches.get(batch_id)
        final = final_status(batch)
        finished = time.time()
        ended = batch.model_copy(update={"status": final, "eta_s": None,
                                         "finished_at": datetime.fromtimestamp(finished, UTC)})
        told = self.batches.notify(batch_id, attempt, batch.status, final, finished, batch_payload(ended.public()))
        if told > 0:
            log.info("batch %s %s (attempt %d)", batch_id, final, attempt)
        return told

    def _copy_to_s3(self, batch_id: str) -> None:
        """results.jsonl (and errors.jsonl when a line was refused) under <results_s3_uri>/batches/<id>/; best
        effort: the results stay readable from the API whatever S3 does."""
        prefix = f"{self.settings.results_s3_uri.rstrip('/')}/batches/{batch_id}"
        client, part = s3_client(self.settings), self.settings.batch_results_part_bytes
        try:
            output = parse_s3_uri(f"{prefix}/results.jsonl")
            write_s3(client, output, result_lines(self.batches, batch_id), part)
            errors = None
            if self.batches.get(batch_id).counts.refused:
                errors = parse_s3_uri(f"{prefix}/errors.jsonl")
                write_s3(client, errors, error_lines(self.batches, batch_id), part)
            self.batches.record_outputs(batch_id, output.uri, errors.uri if errors else None)
        except Exception:  # botocore's errors, whatever they are
            log.warning("batch %s: results not copied to %s", batch_id, prefix, exc_info=True)


def final_status(batch: Batch) -> BatchStatus:
    """How an ended batch ends: canceled if it was, failed if it could not read its whole input (or refused a strict
    line), else completed (whatever became of each item: see its counts)."""
    if batch.status == BatchStatus.CANCELED:
        return BatchStatus.CANCELED
    return BatchStatus.FAILED if batch.error is not None else BatchStatus.COMPLETED
