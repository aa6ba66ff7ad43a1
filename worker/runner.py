"""What a task thread does with one job: mark it running, fetch its images, have them decoded and the processor
run (worker/preprocess.py: in a process pool, or in this thread), wait for the GPU thread to decode it (with
others), store the outcome."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import redis

from shared.config import Settings
from shared.errors import ImageUnreadable, InferenceFailed, VisionqError, WorkerLost
from shared.images.refs import Access, fetch_images
from shared.images.uploads import UploadStore
from shared.jobs import Job, JobFailure, JobResult, Timings, TokenCounts, utcnow
from shared.store.api_keys import KeyStore
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry
from worker.archive import archive_result
from worker.batcher import Batcher
from worker.engine import Engine, load_count
from worker.preprocess import Preprocessor

log = logging.getLogger(__name__)


@dataclass
class JobRunner:
    """Runs jobs by id against one engine; every job it starts ends in exactly one terminal state."""

    settings: Settings
    store: JobStore
    workers: WorkerRegistry
    engine: Engine
    batcher: Batcher
    worker_name: str
    preprocessor: Preprocessor
    uploads: UploadStore | None = None  # where upload:// refs are read (None: such jobs fail as invalid)
    cpu_work: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        # Few task threads do Python work at once (the processor, storing a result): with all 2 x max_batch of
        # them runnable, the GPU thread would get the GIL between kernel launches of the (eager) prefill too rarely
        # to keep the GPU busy; the end of a batch wakes max_batch of them at once.
        self.cpu_work = threading.BoundedSemaphore(self.settings.prepare_threads)

    def run(self, job_id: str) -> None:
        """Run one job; a job that is gone, finished or canceled is skipped."""
        job = self.store.get(job_id)
        if job is None or job.status.is_terminal():
            log.info("job %s skipped: %s", job_id, "gone" if job is None else job.status)
            return
        deadline = job.start_deadline()
        if deadline is not None and time.time() > deadline and job.attempts == 0:
            # On the list past its deadline (the queue's tick had not ended it yet): it must not run.
            self.store.fail_past_deadline(job_id)
            return
        transition = self.store.mark_running(job_id, self.worker_name)
        if not transition.applied:
            return
        if transition.attempts > self.settings.max_attempts:
            self._fail(job_id, WorkerLost(f"the job was interrupted {transition.attempts - 1} times"))
            return
        tokens = 0
        try:
            tokens = self._execute(job)
        except VisionqError as exc:
            self._fail(job_id, exc)
        except redis.ConnectionError:
            raise  # not the job's fault: the task requeues it
        except Exception:
            log.exception("job %s failed in inference", job_id)
            self._fail(job_id, InferenceFailed())
        finally:
            self.workers.count_job(self.worker_name, loads=load_count(), tokens=tokens)

    def _execute(self, job: Job) -> int:
        """Run the job and store its result; the tokens it generated (0 when it was canceled)."""
        started = time.perf_counter()
        queue_ms = (utcnow() - job.created_at).total_seconds() * 1000
        with self.batcher.expect():  # submitted inside: the GPU thread sees either a preparer or a ticket
            blobs = self._fetch_images(job)  # mostly waiting on I/O, not on the GIL
            # Inline, the decode and the processor are this process's Python work; in the pool they are not, and
            # the pool's size bounds them.
            here = self.settings.preprocess_inline_when_idle and self.batcher.idle()
            with self.cpu_work if not self.preprocessor.processes else nullcontext():
                # Decode errors keep their image codes (shared/images/decode.py), also from a pool process.
                prompt = self.preprocessor.prepare(blobs, job.question, job.max_new_tokens, job.num_crops, here)
            images_ms = (time.perf_counter() - started) * 1000
            future = self.batcher.submit(job.id, prompt)
        try:
            completion = future.result(timeout=self.settings.job_timeout_s)
        except TimeoutError:
            raise InferenceFailed(f"the model did not finish the job within {self.settings.job_timeout_s} s") from None
        if completion.canceled:
            log.info("job %s was canceled while it ran", job.id)
            return 0
        with self.cpu_work:  # storing the result is Python work that competes with the GPU thread too
            tokens = self._store_result(job, completion, (time.perf_counter() - started) * 1000 - images_ms,
                                        queue_ms, images_ms)
        if tokens is not None and self.settings.results_s3_uri:
            archive_result(self.store.get(job.id) or job, self.settings)
        return tokens or 0

    def _store_result(self, job: Job, completion, inference_ms: float, queue_ms: float, images_ms: float) -> int | None:
        """Mark the job succeeded with its result; the tokens it generated, or None when it was ended elsewhere."""
        generation = self.engine.generation(completion, inference_ms)
        result = JobResult(
            text=generation.text,
            model=self.engine.model_id,
            tokens=TokenCounts(prompt=generation.prompt_tokens, completion=generation.completion_tokens),
            timings=Timings(queue_ms=round(queue_ms, 3), images_ms=round(images_ms, 3),
                            inference_ms=round(generation.inference_ms, 3)),
        )
        if not self.store.mark_succeeded(job.id, result).applied:
            log.info("job %s was ended elsewhere (canceled?) while it ran; result dropped", job.id)
            return None
        return generation.completion_tokens

    def _fetch_images(self, job: Job) -> list[bytes]:
        try:
            return fetch_images(job.images, self.settings, self._access(job))
        except (VisionqError, redis.RedisError):
            raise  # a job failure with its code; or the store is down, and the task requeues the job
        except Exception:  # a header parser's surprise must not pass for a model failure
            log.exception("job %s: an image could not be loaded", job.id)
            raise ImageUnreadable("an image of the job could not be read") from None

    def _access(self, job: Job) -> Access:
        """What the job's refs may reach, as its owner's key says now (a bucket removed since submit is refused)."""
        needs_key = job.owner and any(ref[:5].lower() == "s3://" for ref in job.images)
        key = KeyStore(self.store.redis).get(job.owner) if needs_key else None
        return Access(job.owner, frozenset(key.s3_buckets) if key else frozenset(), self.uploads)

    def _fail(self, job_id: str, exc: VisionqError) -> None:
        self.store.mark_failed(job_id, JobFailure(code=exc.code, message=exc.message))
