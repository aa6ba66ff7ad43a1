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
    # Celery's Redis transport redelivers a job unacknowledged for this long. Workers renew the lease of each job
    # they hold every heartbeat_s (worker/leases.py), so it bounds how long a dead worker's job waits, not job length.
    visibility_timeout_s: int = Field(default=60, gt=0)
    # How often a worker looks for jobs whose worker vanished (lease not renewed for visibility_timeout_s).
    restore_interval_s: int = Field(default=10, ge=1)
    max_attempts: int = Field(default=3, ge=1)

    log_level: str = "INFO"

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

    # --- scale-out (issue 7): several models, one worker per GPU, metrics, logs --------------------------------
    # The models the API accepts (comma-separated); empty: only `model`. A job names one (default: `model`) and
    # goes to that model's queue (shared/routing.py); a worker serves its own `model` only.
    models: str = ""
    # Workers beat (and renew the leases of the jobs they hold) this often.
    heartbeat_s: float = Field(default=10.0, gt=0)
    # A worker serves Prometheus metrics on this port (0: none); `visionq workers` gives its N-th child port + N.
    metrics_port: int = Field(default=0, ge=0)
    log_format: Literal["json", "text"] = "json"
    # With redis_url sentinel://host:26379;sentinel://host2:26379, the primary the sentinels know by this name.
    redis_sentinel_master: str = "mymaster"

    @model_validator(mode="after")
    def _leases_outlast_heartbeats(self) -> Settings:
        if self.visibility_timeout_s < 3 * self.heartbeat_s:
            raise ValueError("visibility_timeout_s must be at least 3 heartbeats, or a live worker's job runs twice")
        return self

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
