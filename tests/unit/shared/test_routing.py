"""A job names its model (or gets the default) and goes to that model's queue; other models are refused."""

from __future__ import annotations

import pytest

from shared.config import Settings
from shared.errors import UnknownModel
from shared.routing import queue_for, resolve_model, worker_queue

SETTINGS = Settings(queue="vq", model="org/default", models="org/other")


def test_a_job_without_a_model_runs_on_the_default():
    assert resolve_model(SETTINGS, None) == "org/default"


def test_a_listed_model_is_taken_and_an_unlisted_one_refused():
    assert resolve_model(SETTINGS, "org/other") == "org/other"
    with pytest.raises(UnknownModel) as refused:
        resolve_model(SETTINGS, "org/missing")
    assert refused.value.code == "unknown_model" and refused.value.http_status == 422
    assert "org/default, org/other" in refused.value.message


def test_each_model_has_its_own_queue_and_a_worker_consumes_its_models():
    assert queue_for(SETTINGS, "org/default") != queue_for(SETTINGS, "org/other")
    assert worker_queue(Settings(queue="vq", model="org/other")) == queue_for(SETTINGS, "org/other") == "vq:org/other"
