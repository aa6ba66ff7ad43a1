"""Every Redis key, channel and queue name visionq uses, built here and nowhere else.

Lua scripts receive their keys from these functions. Where a script learns part of a name only while it runs (the
owner of the job it ends, the ids of that owner's endpoints), it gets a template from here with a `{placeholder}`
and fills it in (shared/store/lua/fill.lua). visionq runs on one Redis (or a primary with replicas), not Cluster.
"""

from __future__ import annotations

import hashlib

PREFIX = "visionq"
OWNER_PREFIX = f"{PREFIX}:owner:"

# --- jobs ----------------------------------------------------------------------------------------------------


def job_key(job_id: str) -> str:
    """Hash of one job (shared/jobs.py's Job.to_hash)."""
    return f"{PREFIX}:job:{job_id}"


def job_done_channel(job_id: str) -> str:
    """Pub/sub channel on which a job's terminal transition publishes (the API's ?wait listens)."""
    return f"{PREFIX}:job:{job_id}:done"


JOB_DONE_PATTERN = job_done_channel("*")


def job_id_from_done_channel(channel: str) -> str:
    return channel[len(f"{PREFIX}:job:"):-len(":done")]


# hash: status -> how many jobs are in it (queued, running) or have ended in it (terminal ones, since the start)
STATUS_COUNTS_KEY = f"{PREFIX}:stats:status"


def idempotency_key(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


# --- owners (API keys) ---------------------------------------------------------------------------------------


def owner_jobs_key(owner: str) -> str:
    """Zset of an owner's jobs by creation time (GET /v1/jobs)."""
    return f"{OWNER_PREFIX}{owner}:jobs"


def owner_active_key(owner: str) -> str:
    """How many of an owner's jobs are queued or running (its max_active_jobs bound)."""
    return f"{OWNER_PREFIX}{owner}:active"


def rate_key(owner: str) -> str:
    """An owner's token bucket (shared/store/rates.py)."""
    return f"{PREFIX}:rate:{owner}"


def api_key_key(secret_hash: str) -> str:
    return f"{PREFIX}:apikey:{secret_hash}"


API_KEY_IDS = f"{PREFIX}:apikeys"  # hash: key id -> secret hash

# --- the queue: Celery's Redis transport and visionq's index of queued jobs ---------------------------------

KOMBU_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages (visionq sets no key prefix)
KOMBU_UNACKED_INDEX = "unacked_index"  # kombu's zset of their delivery times
KOMBU_UNACKED_MUTEX = "unacked_mutex"  # kombu's lock on its sweep for abandoned messages


def job_queue(queue_prefix: str, model: str) -> str:
    """The queue (a Redis list, Celery's queue) of one model's jobs: named from the model alone, so that the API
    and every worker, on any host, agree on it without talking to each other."""
    return f"{queue_prefix}:{model}"


def webhook_queue(queue_prefix: str) -> str:
    """The Celery queue of webhook deliveries (consumed by CPU workers, never by a GPU worker)."""
    return f"{queue_prefix}-webhooks"


def queued_index_key(queue: str) -> str:
    """Zset of a queue's jobs still queued: job id -> sequence number once on the list, WAITING_BASE + sequence
    number while it waits for the list (shared/store/queues.py)."""
    return f"{PREFIX}:queued:{queue}"


def queue_watermark_key(queue: str) -> str:
    """The highest sequence number a worker has started in this queue."""
    return f"{queued_index_key(queue)}:started"


def queue_suspects_key(queue: str) -> str:
    """Hash: job id -> when the sweep first saw it still queued below the watermark."""
    return f"{queued_index_key(queue)}:suspects"


def queue_seq_key(queue: str) -> str:
    return f"{PREFIX}:queue-seq:{queue}"


# --- the queue's policy (shared/store/queues.py, lua/dispatch.lua): jobs wait per key, then move to the list ---


def waiting_key(queue: str, owner: str) -> str:
    """Zset of one key's jobs waiting for this queue's list: job id -> priority rank * 2**44 + sequence number."""
    return f"{PREFIX}:waiting:{queue}:{owner}"


def waiting_owners_key(queue: str) -> str:
    """Zset of the keys with jobs waiting for this queue: owner -> its virtual time (the next to go is the least)."""
    return f"{PREFIX}:waiting:{queue}"


def queue_clock_key(queue: str) -> str:
    """The queue's virtual clock: the virtual time of the last key served (a key that starts waiting starts here)."""
    return f"{PREFIX}:vclock:{queue}"


def owner_vtimes_key(queue: str) -> str:
    """Hash: owner -> its virtual time when it last stopped waiting (a key cannot gain by draining and refilling)."""
    return f"{PREFIX}:vtimes:{queue}"


KEY_WEIGHTS = f"{PREFIX}:key-weights"  # hash: key id -> its weight in the fair share (absent: 1)


def deadlines_key(queue: str) -> str:
    """Zset of the queue's queued jobs that have a deadline: job id -> the time by which it must start."""
    return f"{PREFIX}:deadlines:{queue}"


def queue_ends_key(queue: str, bucket: str) -> str:
    """How many of the queue's jobs ended after running, in one 10-second bucket (the recent throughput)."""
    return f"{PREFIX}:ends:{queue}:{bucket}"


def queue_minute_ends_key(queue: str, minute: str) -> str:
    """The same count per minute, kept an hour: the web console's chart of jobs/s."""
    return f"{PREFIX}:ends-minute:{queue}:{minute}"


def queue_workers_key(queue: str) -> str:
    """Zset: worker serving this queue -> its last heartbeat, once its model is loaded."""
    return f"{PREFIX}:serving:{queue}"


def queue_starting_key(queue: str) -> str:
    """Zset: worker of this queue still loading its model -> when it started."""
    return f"{PREFIX}:starting:{queue}"


def queue_tick_lock_key(queue: str) -> str:
    """Held by the one worker running this queue's periodic dispatch and deadline check."""
    return f"{PREFIX}:{queue}:ticking"


def sweep_lock_key(queue: str) -> str:
    """Held by the one worker sweeping this queue for lost messages."""
    return f"{PREFIX}:{queue}:sweeping"


# --- workers -------------------------------------------------------------------------------------------------

WORKERS_KEY = f"{PREFIX}:workers"  # zset: worker name -> time of its last heartbeat


def worker_key(name: str) -> str:
    """Hash of what a worker published about itself (model, pid, loads, batches, ...)."""
    return f"{PREFIX}:worker:{name}"


# --- web console (api/console/) ------------------------------------------------------------------------------


def console_session_key(token_hash: str) -> str:
    """Hash of one console sign-in (key id, CSRF token), found by the hash of its cookie's token."""
    return f"{PREFIX}:console-session:{token_hash}"


# --- batches (shared/batches/) ---------------------------------------------------------------------------------

BATCH_ID_PREFIX = "batch_"  # every batch id starts so (a job id never does): a webhook's subject says which it is


def batch_key(batch_id: str) -> str:
    """Hash of one batch (shared/store/batches.py): its request, status, counts by job status and progress."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_items_key(batch_id: str) -> str:
    """Hash: custom_id -> "<line> <job id>" of the item's current attempt (one line claims one custom_id)."""
    return f"{batch_key(batch_id)}:items"


def batch_order_key(batch_id: str) -> str:
    """List of the batch's custom_ids in the order their lines were admitted (the results file's order)."""
    return f"{batch_key(batch_id)}:order"


def batch_errors_key(batch_id: str) -> str:
    """Zset of the refused lines: the refusal as JSON -> its line number (the errors file)."""
    return f"{batch_key(batch_id)}:errors"


def batch_input_key(batch_id: str) -> str:
    """List of the batch's input, in chunks of bytes: its inline requests, or the JSONL upload it took over."""
    return f"{batch_key(batch_id)}:input"


def batch_seen_key(batch_id: str) -> str:
    """Hash: custom_id -> line, while a strict batch checks every line before it admits any."""
    return f"{batch_key(batch_id)}:seen"


def batch_lock_key(batch_id: str) -> str:
    """Held by the one batch worker thread running the batch's step (a lease: a dead holder frees it)."""
    return f"{batch_key(batch_id)}:lock"


def batch_idempotency_key(owner: str, key: str) -> str:
    return f"{PREFIX}:idem-batch:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def owner_batches_key(owner: str) -> str:
    """Zset of an owner's batches by creation time (GET /v1/batches)."""
    return f"{OWNER_PREFIX}{owner}:batches"


def batch_queue(queue_prefix: str) -> str:
    """The Celery queue of the batch worker (reading inputs, admitting items, finishing batches; CPU only)."""
    return f"{queue_prefix}-batches"


def batches_due_key(queue: str) -> str:
    """Zset: batch id -> when its next step is due (waiting for room under its key's cap, or after a read error),
    one per batch queue."""
    return f"{PREFIX}:batches:{queue}:due"


def batches_open_key(queue: str) -> str:
    """Zset: batch id -> when its items' lifetimes are next renewed, for every batch not ended yet (a batch may run
    longer than RESULT_TTL_S: its items, queued or ended, must outlive it), one per batch queue."""
    return f"{PREFIX}:batches:{queue}:open"


# --- webhooks ------------------------------------------------------------------------------------------------


def subject_key(subject_id: str) -> str:
    """The hash whose end an event tells: a batch's, or a job's (deliveries hang off it)."""
    return batch_key(subject_id) if subject_id.startswith(BATCH_ID_PREFIX) else job_key(subject_id)


def delivery_key(subject_id: str, delivery_id: str) -> str:
    return f"{subject_key(subject_id)}:delivery:{delivery_id}"


def delivery_log_key(subject_id: str, delivery_id: str) -> str:
    return f"{delivery_key(subject_id, delivery_id)}:log"


def deliveries_key(subject_id: str) -> str:
    """List of a job's (or a batch's) delivery ids, in the order the outbox wrote them."""
    return f"{subject_key(subject_id)}:deliveries"


def webhooks_due_key(queue: str) -> str:
    """The zset of deliveries by due time, one per webhook queue (each stack's delivery workers poll theirs)."""
    return f"{PREFIX}:webhooks:{queue}:due"


def endpoints_key(owner: str) -> str:
    """Hash of an owner's registered endpoints: endpoint id -> endpoint JSON."""
    return f"{OWNER_PREFIX}{owner}:webhooks"


def job_webhook_secret_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:webhook_secret"


# --- uploads -------------------------------------------------------------------------------------------------


def upload_key(upload_id: str) -> str:
    """Hash of one upload (shared/images/uploads.py): owner, size, and the bytes or where they are in S3."""
    return f"{PREFIX}:upload:{upload_id}"


def upload_chunks_key(upload_id: str) -> str:
    """List of a JSONL upload's bytes in chunks (a batch's input file), beside its hash."""
    return f"{upload_key(upload_id)}:chunks"


def upload_bytes_key(owner: str, window: int) -> str:
    """Bytes an owner uploaded in one window of upload_ttl_s seconds (the upload quota)."""
    return f"{PREFIX}:upload-bytes:{owner}:{window}"
