"""Settings come from VISIONQ_* environment variables, with defaults that work locally."""

import pytest
from pydantic import ValidationError

from shared.config import DEFAULT_MODEL, LOCAL_REDIS_URL, Settings


def test_defaults(monkeypatch):
    for key in ("VISIONQ_MODEL", "VISIONQ_REDIS_URL", "VISIONQ_RESULT_TTL_S"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.broker_url == LOCAL_REDIS_URL
    assert settings.result_ttl_s == 24 * 3600
    assert settings.visibility_timeout_s >= 3 * settings.heartbeat_s
    assert settings.served_models == [DEFAULT_MODEL]


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("VISIONQ_MODEL", "some/model")
    monkeypatch.setenv("VISIONQ_REDIS_URL", "redis://example:6379/3")
    monkeypatch.setenv("VISIONQ_MAX_IMAGES", "4")
    settings = Settings()
    assert (settings.model, settings.broker_url, settings.max_images) == ("some/model", "redis://example:6379/3", 4)


def test_a_lease_must_outlast_several_heartbeats():
    with pytest.raises(ValidationError):
        Settings(heartbeat_s=10, visibility_timeout_s=20)
    assert Settings(heartbeat_s=1, visibility_timeout_s=3).visibility_timeout_s == 3


def test_an_fp8_kv_cache_needs_the_cache_by_blocks():
    assert Settings().kv_cache_dtype == "auto"  # the model's own dtype, and its exact outputs, by default
    with pytest.raises(ValidationError, match="kv_blocks"):
        Settings(kv_cache_dtype="fp8", kv_blocks=False)
    assert Settings(kv_cache_dtype="fp8").kv_blocks


def test_served_models_put_the_default_first_without_repeats():
    settings = Settings(model="a/one", models=" b/two, a/one,,c/three ")
    assert settings.served_models == ["a/one", "b/two", "c/three"]


def test_attention_auto_is_sdpa_without_flash_attn_or_cuda():
    import torch

    from worker.engine import resolve_attention

    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("eager", torch.device("cpu")) == "eager"
