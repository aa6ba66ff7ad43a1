"""One settings object, read from VISIONQ_* environment variables once at start-up and passed down."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Every knob of visionq; defaults work on a laptop."""

    model_config = SettingsConfigDict(env_prefix="VISIONQ_", extra="ignore")

    # --- Redis: where jobs, keys and queues live ---------------------------------------------------------------
    # Empty: `visionq up`/`demo` start an embedded server; `api`/`worker` use LOCAL_REDIS_URL.
    redis_url: str = ""
    # With redis_url sentinel://host:26379;sentinel://host2:26379, the primary the sentinels know by this name.
    redis_sentinel_master: str = "mymaster"
    queue: str = "visionq"  # the prefix of every queue's name (shared/routing.py)

    # --- Models: what the workers serve, and how they load it --------------------------------------------------
    model: str = DEFAULT_MODEL  # the default model, and the one a worker of these settings serves
    # Other models the API accepts (comma-separated). A job names one (default: `model`) and goes to that model's
    # queue; a worker serves its own `model` only.
    models: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa
    trust_remote_code: bool = False
    # Models that take a job's num_crops (Phi-3-vision's processor), as shell-style patterns matched against the
    # model's name, case-insensitively. The API decides from the name alone: it loads no model, and a job may be
    # submitted before any worker of its model has started (a worker whose processor turns out not to take it
    # fails such a job with the same code).
    num_crops_models: list[str] = ["*phi-3-vision*", "*phi-3.5-vision*"]

    # --- Requests: the bounds of what one request may ask for --------------------------------------------------
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_images: int = Field(default=8, ge=2)
    max_question_chars: int = Field(default=2000, gt=0)
    max_new_tokens_limit: int = Field(default=1024, gt=0)
    default_max_new_tokens: int = Field(default=256, gt=0)
    max_wait_s: float = 60.0  # the longest ?wait a poll may hold
    list_max_limit: int = Field(default=100, ge=1)

    # --- API keys, rate limits and quotas ----------------------------------------------------------------------
    auth_enabled: bool = True
    rate_per_s: float = Field(default=200.0, gt=0)  # per key, unless the key says otherwise
    rate_burst: int = Field(default=400, ge=1)
    max_active_jobs: int = Field(default=10_000, ge=1)  # queued or running at once, per key
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    key_cache_s: float = Field(default=2.0, ge=0)  # a revoked key may work this long in a process that cached it
    console_session_s: int = Field(default=8 * 3600, gt=0)  # a web console sign-in lasts this long (api/console/)

    # --- Images: sources and bounds (shared/images/) -----------------------------------------------------------
    image_root: Path = Path("images")  # where plain paths in a job's images are read from
    max_image_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_side: int = Field(default=16_384, gt=0)  # longest side, in pixels
    max_job_image_bytes: int = Field(default=40 * 1024 * 1024, gt=0)  # all images of one job together
    max_job_image_pixels: int = Field(default=80_000_000, gt=0)
    image_fetch_threads: int = Field(default=4, ge=1)  # images of one job fetched at once
    upload_ttl_s: int = Field(default=3600, gt=0)
    max_upload_bytes_per_key: int = Field(default=1024**3, gt=0)  # bytes one key may have stored at once
    uploads_s3_uri: str = ""  # s3://bucket/prefix: upload bytes go there, their owner and expiry stay in Redis

    # --- Outbound URLs: the SSRF guard (shared/outbound/netguard.py) and S3 -----------------------------------
    # Lists are JSON in the environment, e.g. VISIONQ_URL_ALLOWED_NETWORKS='["127.0.0.0/8"]'.
    allow_http: bool = False  # plain http:// URLs (https only by default)
    url_allowed_networks: list[str] = []  # CIDRs exempt from the non-global-address rule
    # Webhook targets have their own allowances (the host lists and timeouts are shared): loosening one for local
    # development never opens the other (shared/webhooks/targets.py).
    webhook_allow_http: bool = False
    webhook_allowed_networks: list[str] = []
    url_allow_hosts: list[str] = []  # non-empty: only these hosts (and their subdomains)
    url_deny_hosts: list[str] = []  # never these hosts (and their subdomains)
    url_connect_timeout_s: float = Field(default=5.0, gt=0)
    url_read_timeout_s: float = Field(default=10.0, gt=0)  # between two reads of one response
    url_total_timeout_s: float = Field(default=30.0, gt=0)  # one whole fetch, redirects included
    url_max_redirects: int = Field(default=3, ge=0)
    s3_endpoint_url: str = ""  # empty: AWS; else MinIO, R2, ... (credentials: boto3's standard chain)
    s3_region: str = ""  # empty: boto3's default (AWS_DEFAULT_REGION, ~/.aws/config)
    s3_allowed_buckets: list[str] = []  # buckets every key may read (["*"]: any); keys add their own

    # --- Jobs: lifetimes, delivery to workers and retries ------------------------------------------------------
    result_ttl_s: int = Field(default=24 * 3600, gt=0)  # how long an ended job and its result are kept
    job_timeout_s: int = Field(default=900, gt=0)
    # Celery's Redis transport redelivers a job unacknowledged for this long. Workers renew the lease of each job
    # they hold every heartbeat_s (worker/heartbeat.py), so it bounds how long a dead worker's job waits, not job
    # length.
    visibility_timeout_s: int = Field(default=60, gt=0)
    # How often a worker looks for jobs whose worker vanished (lease not renewed for visibility_timeout_s).
    restore_interval_s: int = Field(default=10, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    heartbeat_s: float = Field(default=10.0, gt=0)  # workers beat (and renew their jobs' leases) this often
    results_s3_uri: str = ""  # s3://bucket/prefix: the worker also writes each succeeded job there, as <id>.json

    # --- The queue's policy (shared/store/queues.py): fair share by key, priorities, deadlines ------------------
    broker_window: int = Field(default=16, ge=1)  # messages a model's Celery list holds beyond what workers took
    default_start_within_s: float = Field(default=0, ge=0)  # a job's start deadline when it sets none (0: none)
    queue_tick_s: float = Field(default=1.0, gt=0)  # each queue's dispatch and deadline check by a worker
    queue_figures_cache_s: float = Field(default=1.0, ge=0)  # an API process keeps a queue's workers/throughput

    # --- Batching and decoding in the GPU worker (worker/batcher.py, worker/decoding.py) -----------------------
    max_batch: int = Field(default=64, ge=1)  # jobs decoded together; the worker runs 2x this many task threads
    # How long a run may wait to fill while the tickets it has were not all handed over by tasks (probes, tests);
    # a worker's lone job, with no other task preparing one, waits for nothing (worker/batcher.py).
    batch_wait_ms: float = Field(default=5.0, ge=0)
    batch_fill_ms: float = Field(default=20.0, ge=0)  # longer, but only for jobs the worker is already preparing
    prepare_threads: int = Field(default=4, ge=1)  # task threads running the processor or storing a result at once
    # Processes that decode images and run the processor (worker/preprocess.py), off the GPU thread's GIL. auto:
    # min(4, CPUs - 1) on CUDA, 0 on the CPU; 0: in the task threads.
    preprocess_processes: int | Literal["auto"] = "auto"
    # An idle worker (no row decoding, no job waiting for the GPU) prepares a lone job in its own process, without
    # the pool's round trip (~20 ms of a job's latency on the H200 host with concurrent.futures' pool; not
    # measurable with worker/encoder_pool.py's). Off by default: a decoder crash there ends the worker (its jobs
    # are sent again) where in the pool it ends one pool process.
    preprocess_inline_when_idle: bool = False
    cuda_graphs: bool = True  # capture the decode step per (rows, length) bucket on CUDA
    fused_kernels: bool = True  # Triton kernels for norms, rotary and activations on CUDA (worker/kernels.py)
    # Linear layers of at most this many rows (a decode step of a few jobs) by worker/gemv.py's kernel on CUDA, which
    # reads the weights faster than cuBLAS there; 0: cuBLAS always. Only with fused_kernels.
    gemv_max_rows: int = Field(default=1, ge=0, le=16)
    # Of the GPU memory left after loading the weights, for the KV arena; the rest holds a prefill chunk's activations.
    kv_cache_fraction: float = Field(default=0.75, gt=0, le=1)
    cpu_kv_cache_mb: int = Field(default=2048, gt=0)
    prefill_tokens: int = Field(default=16384, gt=0)  # padded prompt tokens per prefill forward
    # Prompt tokens that join the running rows per decode step (the first waiting prompt always joins): every row
    # that decodes waits for them, so a small share keeps short jobs moving; a burst joins over several steps.
    step_prefill_tokens: int = Field(default=4096, gt=0)
    # The KV cache by blocks (worker/blocks.py): rows of any length share one pool, admitted by free blocks; off,
    # rows of one layout length (the longest need of the run's first prompts). On: on the H200, mixed lengths ran at
    # 1.32x the output tokens/s of rows of one length, uniform ones at 1.03x (README, "How a GPU worker batches").
    kv_blocks: bool = True
    # auto: keys and values in the model's dtype (a job's output is exactly the model's). fp8 (float8_e4m3fn,
    # saturating, no scales): half the bytes, so twice the tokens in the budget and a decode step at many rows reads
    # half as much; outputs drift from the model's. Opt-in, as vLLM's kv_cache_dtype; needs kv_blocks.
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"

    # --- Batches (shared/batches/): one request for many jobs ---------------------------------------------------
    batch_max_items: int = Field(default=100_000, ge=1)  # lines (or objects under an S3 prefix) of one batch
    batch_max_input_bytes: int = Field(default=200 * 1024 * 1024, gt=0)  # a JSONL input (upload or S3 object)
    batch_max_line_bytes: int = Field(default=1024 * 1024, gt=0)  # one line of it
    batch_max_inline_requests: int = Field(default=1000, ge=1)  # "requests": [...] in the body itself
    batch_chunk_items: int = Field(default=500, ge=1)  # lines read, checked and admitted per round trip
    # The share of a key's max_active_jobs its batches' items may fill, so that its own single jobs keep room.
    batch_active_share: float = Field(default=0.9, gt=0, le=1)
    batch_poll_s: float = Field(default=1.0, gt=0)  # how often batches waiting for room (or a retry) are looked at
    batch_concurrency: int = Field(default=4, ge=1)  # threads of one batch worker
    batch_results_part_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)  # S3 multipart part size

    # --- Webhooks (shared/webhooks/) ---------------------------------------------------------------------------
    # Retries back off exponentially from base to max (with jitter) until give_up_s after the event; then the
    # delivery is marked failed.
    webhook_timeout_s: float = Field(default=10.0, gt=0)  # each phase of one request: connect, send, answer
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    webhook_give_up_s: float = Field(default=12 * 3600.0, gt=0)
    webhook_poll_s: float = Field(default=1.0, gt=0)  # how often the delivery worker looks for due retries
    webhook_concurrency: int = Field(default=8, ge=1)  # threads of one delivery worker
    webhook_max_endpoints: int = Field(default=10, ge=0)  # registered endpoints per API key
    webhook_max_url_chars: int = Field(default=2048, gt=0)
    webhook_max_log: int = Field(default=50, ge=1)  # attempts kept per delivery (the latest)

    # --- Processes: the API server, logs, metrics, local state -------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 2
    api_threads: int = 16
    # How long gunicorn keeps an idle connection open: longer than a load balancer's idle timeout (60 s on the
    # common ones), or the balancer reuses a connection the API has just closed (a reset).
    api_keepalive_s: int = Field(default=75, ge=1)
    # A connection is closed after this many requests (0: never), as nginx's keepalive_requests (also 1000): each
    # gunicorn process keeps every connection it accepts, and the kernel may give one process most of a client's
    # (or a balancer's) pool, leaving the other cores idle; reconnecting spreads them again. Not much lower:
    # gunicorn closes a connection on its main loop, lingering until the client's FIN (an RTT per close).
    api_keepalive_requests: int = Field(default=1000, ge=0)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # A worker serves Prometheus metrics on this port (0: none); `visionq workers` gives its N-th child port + N.
    metrics_port: int = Field(default=0, ge=0)
    data_dir: Path = Path(".visionq")  # logs and state of the processes `visionq up` and `demo` start

    @field_validator("uploads_s3_uri", "results_s3_uri")
    @classmethod
    def _s3_prefix(cls, value: str) -> str:
        if value and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
            raise ValueError("must be empty or s3://bucket[/prefix]")
        return value

    @field_validator("url_allowed_networks", "webhook_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # a ValueError here stops a bad configuration at start-up
        return value

    @field_validator("url_allow_hosts", "url_deny_hosts")
    @classmethod
    def _hosts_lower(cls, value: list[str]) -> list[str]:
        return [host.strip().lower().rstrip(".") for host in value if host.strip()]

    @model_validator(mode="after")
    def _leases_outlast_heartbeats(self) -> Settings:
        if self.visibility_timeout_s < 3 * self.heartbeat_s:
            raise ValueError("visibility_timeout_s must be at least 3 heartbeats, or a live worker's job runs twice")
        return self

    @model_validator(mode="after")
    def _fp8_cache_has_blocks(self) -> Settings:
        if self.kv_cache_dtype == "fp8" and not self.kv_blocks:
            raise ValueError("kv_cache_dtype fp8 needs kv_blocks (the block kernels read and write fp8)")
        return self

    @property
    def webhook_horizon_s(self) -> float:
        """When retries stop: give_up_s, but never after the job (and its delivery records) expires."""
        return min(self.webhook_give_up_s, self.result_ttl_s * 0.9)

    @property
    def webhook_lease_s(self) -> float:
        """How long a delivery attempt may hold its delivery: a worker killed mid-send frees it after this."""
        return self.webhook_timeout_s * 3 + 2

    @property
    def served_models(self) -> list[str]:
        """The models jobs may name, the default (`model`) first."""
        extra = [name.strip() for name in self.models.split(",") if name.strip()]
        return [self.model, *(name for name in extra if name != self.model)]

    @property
    def broker_url(self) -> str:
        """The Redis URL to use: the configured one, else a server on localhost."""
        return self.redis_url or LOCAL_REDIS_URL


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
