"""One settings object, read from VISIONQ_* environment variables once at start-up and passed down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Every knob of visionq; defaults work on a laptop."""

    model_config = SettingsConfigDict(env_prefix="VISIONQ_", extra="ignore")

    # Where jobs live. Empty: `visionq up`/`demo` start an embedded server; `api`/`worker` use LOCAL_REDIS_URL.
    redis_url: str = ""
    queue: str = "visionq"
    data_dir: Path = Path(".visionq")

    # The model the worker serves.
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa
    trust_remote_code: bool = False

    # Bounds on what a request may ask for.
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_images: int = Field(default=8, ge=2)
    max_question_chars: int = Field(default=2000, gt=0)
    max_new_tokens_limit: int = Field(default=1024, gt=0)
    default_max_new_tokens: int = Field(default=256, gt=0)
    max_wait_s: float = 60.0

    # Images.
    image_root: Path = Path("images")
    max_image_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)

    # Lifetimes and delivery.
    result_ttl_s: int = Field(default=24 * 3600, gt=0)
    job_timeout_s: int = Field(default=900, gt=0)
    # Celery's Redis transport redelivers an unacknowledged job after this long: it must outlast the longest job.
    visibility_timeout_s: int = Field(default=3600, gt=0)
    # How often a worker looks for jobs whose worker vanished (unacknowledged for visibility_timeout_s).
    restore_interval_s: int = Field(default=10, ge=1)
    max_attempts: int = Field(default=3, ge=1)

    log_level: str = "INFO"

    # Batching and decoding in the GPU worker.
    max_batch: int = Field(default=64, ge=1)  # jobs decoded together; the worker runs 2x this many task threads
    batch_wait_ms: float = Field(default=5.0, ge=0)  # how long a batch may wait to fill: a lone job's extra delay
    batch_fill_ms: float = Field(default=200.0, ge=0)  # longer, but only for jobs the worker is already preparing
    prepare_threads: int = Field(default=4, ge=1)  # task threads loading images and running the processor at once
    cuda_graphs: bool = True  # capture the decode step per (rows, length) bucket on CUDA
    # Of the GPU memory left after loading the weights; the rest holds a prefill chunk's activations and cache.
    kv_cache_fraction: float = Field(default=0.65, gt=0, le=1)
    cpu_kv_cache_mb: int = Field(default=2048, gt=0)
    prefill_tokens: int = Field(default=16384, gt=0)  # padded prompt tokens per prefill forward

    # API keys, quotas and listing.
    auth_enabled: bool = True
    rate_per_s: float = Field(default=200.0, gt=0)  # per key, unless the key says otherwise
    rate_burst: int = Field(default=400, ge=1)
    max_active_jobs: int = Field(default=10_000, ge=1)  # queued or running at once, per key
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    list_max_limit: int = Field(default=100, ge=1)
    key_cache_s: float = Field(default=2.0, ge=0)  # a revoked key may work this long in a process that cached it

    # Local servers started by the CLI.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 2
    api_threads: int = 16

    @model_validator(mode="after")
    def _redelivery_outlasts_jobs(self) -> Settings:
        if self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError("visibility_timeout_s must be longer than job_timeout_s, or long jobs run twice")
        return self

    @property
    def broker_url(self) -> str:
        """The Redis URL to use: the configured one, else a server on localhost."""
        return self.redis_url or LOCAL_REDIS_URL


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
