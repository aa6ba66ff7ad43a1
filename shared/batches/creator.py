"""The batch worker's step: read the next chunk of a batch's lines, check them, and admit the good ones as jobs
through the same script as POST /v1/jobs (shared/store/jobs.py's create_items), a chunk per round trip, for up to
STEP_BUDGET_S; then queue the next step, or wait for room under the key's cap, or end the input.

A strict batch first checks every line (phase "checking") and admits none if one is refused. A retry walks the
items in order and gives each failed one a new job (phase "retrying"). Whatever the phase, the step records where
it stopped after each chunk, and whatever it does twice (a step redelivered after its worker died) admits nothing
twice: items are found again by custom_id, refusals are scored by line.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis

from shared.batches.batch import BatchSpec, BatchStatus, Phase, error_json
from shared.batches.inputs import (
    ByteSource,
    Chunk,
    InputError,
    Position,
    RedisChunks,
    S3Object,
    S3Prefix,
    read_lines,
    upload_ids,
)
from shared.batches.lines import DUPLICATE_CUSTOM_ID, Candidate, LineContext, check_line, check_object
from shared.batches.results import item_job_ids
from shared.config import Settings
from shared.images.refs import Access
from shared.images.uploads import UploadStore
from shared.jobs import Job, JobStatus, new_job_id, utcnow
from shared.outbound.s3 import parse_s3_uri, s3_client
from shared.routing import queue_for
from shared.store.api_keys import KeyStore
from shared.store.batches import BatchStore, Refusal
from shared.store.jobs import Created, ItemOf, JobStore

log = logging.getLogger(__name__)

STEP_BUDGET_S = 2.0  # a step gives its thread back this often (other batches share the worker)
LOCK_LEASE_S = 60.0  # a step whose thread died frees its batch after this
MAX_READ_ERRORS = 5  # a retryable read error is tried again this many times (backing off) before the input ends
RETRY_AFTER_BUG_S = 30.0


@dataclass(frozen=True)
class Progress:
    """What a chunk came to: "more" (go on), "wait" (the key's cap is full: try later) or "done"."""

    outcome: str
    position: Position


@dataclass
class Creator:
    """Runs batch steps against one Redis client's stores."""

    settings: Settings
    batches: BatchStore
    jobs: JobStore
    keys: KeyStore
    uploads: UploadStore

    def step(self, batch_id: str, holder: str) -> None:
        """Run a step of the batch, unless another thread runs one now; queue the next one if more is left."""
        if not self.batches.lock(batch_id, holder, LOCK_LEASE_S):
            return
        try:
            self.batches.undefer(batch_id)
            outcome = self._run(batch_id)
        except redis.ConnectionError:
            raise  # the task keeps its message: the step runs again once Redis is back
        except Exception:  # a bug must not strand the batch: it is tried again later, and logged
            log.exception("batch %s: step failed; trying again in %s s", batch_id, RETRY_AFTER_BUG_S)
            self.batches.defer(batch_id, RETRY_AFTER_BUG_S)
            outcome = "wait"
        finally:
            self.batches.unlock(batch_id, holder)
        if outcome == "more":
            self.batches.enqueue_steps([batch_id])

    def keep(self, batch_id: str) -> None:
        """Renew the lifetimes of a running batch's items' jobs, queued or ended, and of the uploads its lines
        name, to RESULT_TTL_S from now: a batch may run longer than that, and its items must outlive it."""
        state = self.batches.state(batch_id)
        if not state or state.get("finished_at"):
            self.batches.close(batch_id)
            return
        for job_ids in item_job_ids(self.batches, batch_id):
            self.batches.keep(job_ids)
        if state.get("phase") != Phase.RETRYING:
            try:
                _Run.of(self, batch_id, state).keep_uploads()
            except InputError as exc:  # its input is gone: its uploads too, and its reading stopped on it
                log.info("batch %s: uploads not kept (%s)", batch_id, exc.message)

    def _run(self, batch_id: str) -> str:
        state = self.batches.state(batch_id)
        if not state or state.get("phase") == Phase.DONE:
            return "done"
        if state["status"] == BatchStatus.CANCELED:
            self.batches.finish_input(batch_id)
            return "done"
        try:
            return self._chunks(batch_id, state)
        except InputError as exc:
            return self._read_failed(batch_id, state, exc)

    def _chunks(self, batch_id: str, state: dict[str, str]) -> str:
        phase, run = Phase(state["phase"]), _Run.of(self, batch_id, state)
        position = Position(int(state.get("lines", 0)), int(state.get("offset", 0)), state.get("cursor", ""))
        deadline = time.monotonic() + STEP_BUDGET_S
        while True:
            progress = {Phase.CHECKING: run.check, Phase.ADMITTING: run.admit, Phase.RETRYING: run.retry}[phase](
                position)
            position = progress.position
            if not state.get("uploads_kept") and phase != Phase.RETRYING:
                run.keep_uploads()  # after the first chunk: the first items are not kept waiting for it
                state["uploads_kept"] = "1"
            if progress.outcome != "more" or time.monotonic() >= deadline:
                return self._after(batch_id, phase, progress)

    def _after(self, batch_id: str, phase: Phase, progress: Progress) -> str:
        if progress.outcome == "wait":
            self.batches.defer(batch_id, self.settings.batch_poll_s)
            return "wait"
        if progress.outcome == "more":
            return "more"
        if phase == Phase.CHECKING:
            return self._checked(batch_id)
        nothing = phase == Phase.ADMITTING and not self.batches.get(batch_id).counts.items
        self.batches.finish_input(batch_id, error_json("no_valid_lines", "no line of the input became an item: see "
                                                       "the errors file") if nothing else "")
        return "done"

    def _checked(self, batch_id: str) -> str:
        """A strict batch has checked every line: refused whole if one was refused, else admitted from line 1."""
        refused = self.batches.get(batch_id).counts.refused
        if refused:
            self.batches.finish_input(batch_id, error_json("invalid_lines", f"{refused} lines were refused, so the "
                                                           "strict batch is: see its errors file"))
            return "done"
        self.batches.set_phase(batch_id, Phase.ADMITTING)
        return "more"

    def _read_failed(self, batch_id: str, state: dict[str, str], exc: InputError) -> str:
        errors = int(state.get("read_errors", 0)) + 1
        if exc.retryable and errors < MAX_READ_ERRORS:
            log.warning("batch %s: input read failed (%s); trying again", batch_id, exc.message)
            self.batches.count_read_error(batch_id)
            self.batches.defer(batch_id, self.settings.batch_poll_s * 2 ** errors)
            return "wait"
        self.batches.finish_input(batch_id, error_json(exc.code, exc.message))
        return "done"


@dataclass
class _Run:
    """One step's view of one batch: its context, its input and the cap its items fill."""

    creator: Creator
    batch_id: str
    context: LineContext
    max_active: int
    source: ByteSource | S3Prefix | None

    @classmethod
    def of(cls, creator: Creator, batch_id: str, state: dict[str, str]) -> _Run:
        spec, owner, settings = BatchSpec.model_validate_json(state["spec"]), state["owner"], creator.settings
        key = creator.keys.get(owner)
        buckets = frozenset(key.s3_buckets) if key else frozenset()
        context = LineContext(batch_id, owner, spec, settings, Access(owner, buckets, creator.uploads))
        cap = key.limits(settings)[2] if key else settings.max_active_jobs
        source = None if state["phase"] == Phase.RETRYING else _source(creator, batch_id, spec, state)
        return cls(creator, batch_id, context, max(1, math.floor(cap * settings.batch_active_share)), source)

    # --- reading --------------------------------------------------------------------------------------------

    def _read(self, position: Position) -> Chunk:
        settings = self.context.settings
        if isinstance(self.source, S3Prefix):
            return self.source.read(position, settings.batch_chunk_items, settings.batch_max_items)
        return read_lines(self.source, position, settings.batch_chunk_items, settings.batch_max_line_bytes,
                          settings.batch_max_items)

    def _candidates(self, chunk: Chunk) -> tuple[list[tuple[Candidate, Position]], list[Refusal]]:
        checked, refusals = [], list(chunk.refusals)
        for line, raw, after in chunk.entries:
            if isinstance(self.source, S3Prefix):
                outcome = check_object(str(raw), self.source.bucket, line, self.context)
            else:
                outcome = check_line(raw, line, self.context)
            if isinstance(outcome, Refusal):
                refusals.append(outcome)
            else:
                checked.append((outcome, after))
        return checked, refusals

    def _save(self, position: Position, refusals: list[Refusal]) -> None:
        self.creator.batches.refuse(self.batch_id, refusals)
        self.creator.batches.save_progress(self.batch_id, position.lines, position.offset, position.token)

    def keep_uploads(self) -> None:
        """Keep the uploads the input names as long as a batch's results (a folder's images, uploaded first, may
        be reached hours later, past their own expiry); once per batch."""
        if not isinstance(self.source, S3Prefix):
            for ids in upload_ids(self.source):
                self.creator.uploads.keep(ids, self.context.settings.result_ttl_s)
        self.creator.batches.mark_uploads_kept(self.batch_id)

    # --- the phases -----------------------------------------------------------------------------------------

    def check(self, position: Position) -> Progress:
        """Strict: check a chunk of lines (custom_ids unique across the whole input), admitting none."""
        chunk = self._read(position)
        checked, refusals = self._candidates(chunk)
        held = self.creator.batches.claim_ids(self.batch_id, [(c.custom_id, c.line) for c, _ in checked])
        refusals += [_duplicate(candidate, other) for (candidate, _), other in zip(checked, held, strict=True)
                     if other is not None]
        self._save(chunk.end, refusals)
        return Progress("done" if chunk.done else "more", chunk.end)

    def admit(self, position: Position) -> Progress:
        """Admit a chunk of lines as jobs; stop where the key's cap is full (the next step starts there)."""
        chunk = self._read(position)
        checked, refusals = self._candidates(chunk)
        quiet = not self.context.spec.item_events()
        created = self.creator.jobs.create_items(
            [(c.job, queue_for(self.context.settings, c.job.model), ItemOf(self.batch_id, c.line, quiet=quiet))
             for c, _ in checked], self.max_active)
        stopped = _stopped(position, checked, created, refusals)
        self._save(stopped.position if stopped else chunk.end, refusals)
        return stopped or Progress("done" if chunk.done else "more", chunk.end)

    def retry(self, position: Position) -> Progress:
        """Give the failed items of a chunk of the batch's order a new job each (same custom_id, same request).
        The position's token is where the walk stands in the order (the lines read stay as they were)."""
        batches, start = self.creator.batches, int(position.token or 0)
        custom_ids = batches.custom_ids(self.batch_id, start, self.context.settings.batch_chunk_items)
        items = [item for item in batches.items(self.batch_id, custom_ids) if item is not None]
        retries = [(item, job) for item, job in zip(items, self.creator.jobs.get_many([i.job_id for i in items]),
                                                    strict=True)
                   if job is not None and job.status == JobStatus.FAILED]
        quiet = not self.context.spec.item_events()
        created = self.creator.jobs.create_items(
            [(_new_attempt(job), queue_for(self.context.settings, job.model),
              ItemOf(self.batch_id, item.line, quiet=quiet, retry_of=job.id)) for item, job in retries],
            self.max_active)
        stop = next((index for index, outcome in enumerate(created)
                     if outcome.outcome in ("queue_full", "batch_closed")), None)
        if stop is not None:
            index = start + custom_ids.index(retries[stop][0].custom_id)
            walked = Position(position.lines, position.offset, str(index))
            batches.save_progress(self.batch_id, walked.lines, walked.offset, walked.token)
            return Progress("wait" if created[stop].outcome == "queue_full" else "done", walked)
        walked = Position(position.lines, position.offset, str(start + len(custom_ids)))
        batches.save_progress(self.batch_id, walked.lines, walked.offset, walked.token)
        return Progress("more" if len(custom_ids) == self.context.settings.batch_chunk_items else "done", walked)


def _stopped(start: Position, checked: list[tuple[Candidate, Position]], created: list[Created],
             refusals: list[Refusal]) -> Progress | None:
    """Add refusals for duplicates; where admitting stopped, if it did (the key's cap is full: "wait"; the batch
    was canceled: "done"): just after the last line before the one refused."""
    for index, ((candidate, _), outcome) in enumerate(zip(checked, created, strict=True)):
        if outcome.outcome == "duplicate":
            refusals.append(_duplicate(candidate, int(outcome.detail)))
        elif outcome.outcome in ("queue_full", "batch_closed"):
            resume = checked[index - 1][1] if index else start
            return Progress("wait" if outcome.outcome == "queue_full" else "done", resume)
    return None


def _duplicate(candidate: Candidate, other_line: int) -> Refusal:
    return Refusal(candidate.line, DUPLICATE_CUSTOM_ID,
                   f"custom_id {candidate.custom_id!r} is already line {other_line}'s", candidate.custom_id)


def _new_attempt(job: Job) -> Job:
    """A new job for a failed item: the same request, queued afresh."""
    return Job(id=new_job_id(), status=JobStatus.QUEUED, task=job.task, images=job.images, owner=job.owner,
               image_count=job.image_count, question=job.question, max_new_tokens=job.max_new_tokens,
               model=job.model, created_at=utcnow(), webhook=job.webhook, priority=job.priority,
               batch_id=job.batch_id, custom_id=job.custom_id, num_crops=job.num_crops)


def _source(creator: Creator, batch_id: str, spec: BatchSpec, state: dict[str, str]) -> ByteSource | S3Prefix:
    """Where the batch's lines are read from."""
    settings, kind = creator.settings, spec.input.kind
    if kind == "s3_prefix":
        location = parse_s3_uri(spec.input.uri + "x")  # the bucket, and the prefix with a placeholder key
        return S3Prefix(s3_client(settings), location.bucket, location.key[:-1])
    if kind == "s3":
        location = parse_s3_uri(spec.input.uri)
        return S3Object(s3_client(settings), location.bucket, location.key, settings.batch_max_input_bytes)
    if state.get("input_s3_key"):  # an upload kept in the uploads bucket
        return S3Object(s3_client(settings), creator.uploads.bucket(), state["input_s3_key"],
                        settings.batch_max_input_bytes)
    return RedisChunks(creator.batches, batch_id, int(state.get("input_bytes", 0)))
