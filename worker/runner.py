"""What the worker does with one job: load it, mark it running, fetch images, generate, store the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from PIL import Image

from shared.config import Settings
from shared.errors import ImageUnreadable, InferenceFailed, VisionqError, WorkerLost
from shared.images import Access, load_images
from shared.jobs import Job, JobFailure, JobResult, JobStatus, Timings, TokenCounts, utcnow
from shared.store import JobStore, KeyStore
from shared.uploads import UploadStore
from worker.archive import archive_result
from worker.engine import load_count

log = logging.getLogger(__name__)


class CancelWatch:
    """Answers "was this job canceled?" between decode steps, reading Redis at most every `every_s`."""

    def __init__(self, store: JobStore, job_id: str, every_s: float = 0.2):
        self.store, self.job_id, self.every_s = store, job_id, every_s
        self._last_check = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < self.every_s:
            return False
        self._last_check = now
        return self.store.status(self.job_id) == JobStatus.CANCELED


@dataclass
class JobRunner:
    """Runs jobs by id against one engine; every job it starts ends in exactly one terminal state."""

    settings: Settings
    store: JobStore
    engine: Callable  # () -> Engine, so that the model is only touched when a job needs it
    worker_name: str
    uploads: UploadStore | None = None  # where upload:// refs are read (None: such jobs fail as invalid)

    def run(self, job_id: str) -> None:
        """Run one job; a job that is gone, finished or canceled is skipped."""
        job = self.store.get(job_id)
        if job is None or job.status.is_terminal():
            log.info("job %s skipped: %s", job_id, "gone" if job is None else job.status)
            return
        transition = self.store.mark_running(job_id, self.worker_name)
        if not transition.applied:
            return
        if transition.attempts > self.settings.max_attempts:
            self._fail(job_id, WorkerLost(f"the job was interrupted {transition.attempts - 1} times"))
            return
        try:
            self._execute(job)
        except VisionqError as exc:
            self._fail(job_id, exc)
        except Exception:
            log.exception("job %s failed in inference", job_id)
            self._fail(job_id, InferenceFailed())
        finally:
            self.store.count_worker_job(self.worker_name, loads=load_count())

    def _execute(self, job: Job) -> None:
        started = time.perf_counter()
        queue_ms = (utcnow() - job.created_at).total_seconds() * 1000
        images = self._load_images(job)
        images_ms = (time.perf_counter() - started) * 1000
        engine = self.engine()
        generation = engine.generate(images, job.question, job.max_new_tokens, CancelWatch(self.store, job.id))
        result = JobResult(
            text=generation.text,
            model=engine.model_id,
            tokens=TokenCounts(prompt=generation.prompt_tokens, completion=generation.completion_tokens),
            timings=Timings(queue_ms=round(queue_ms, 3), images_ms=round(images_ms, 3),
                            inference_ms=round(generation.inference_ms, 3)),
        )
        if not self.store.mark_succeeded(job.id, result).applied:
            log.info("job %s was ended elsewhere (canceled?) while it ran; result dropped", job.id)
        elif self.settings.results_s3_uri:
            archive_result(self.store.get(job.id) or job, self.settings)

    def _load_images(self, job: Job) -> list[Image.Image]:
        try:
            return load_images(job.images, self.settings, self._access(job))
        except (VisionqError, redis.RedisError):
            raise  # a job failure with its code; or the store is down, and the task requeues the job
        except Exception:  # a decoder's surprise must not pass for a model failure
            log.exception("job %s: an image could not be loaded", job.id)
            raise ImageUnreadable("an image of the job could not be read") from None

    def _access(self, job: Job) -> Access:
        """What the job's refs may reach, as its owner's key says now (a bucket removed since submit is refused)."""
        needs_key = job.owner and any(ref[:5].lower() == "s3://" for ref in job.images)
        key = KeyStore(self.store.redis).get(job.owner) if needs_key else None
        return Access(job.owner, frozenset(key.s3_buckets) if key else frozenset(), self.uploads)

    def _fail(self, job_id: str, exc: VisionqError) -> None:
        self.store.mark_failed(job_id, JobFailure(code=exc.code, message=exc.message))
