"""A job's num_crops: Phi-3-vision's option, taken from 1 to 16 for the models VISIONQ_NUM_CROPS_MODELS names,
refused with a stable code otherwise; the same check for POST /v1/jobs and batch lines (shared/admission.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.admission import build_job
from shared.config import Settings
from shared.errors import InvalidNumCrops, NumCropsUnsupported
from shared.jobs import Job, JobRequest
from shared.routing import takes_num_crops

SETTINGS = Settings(model="microsoft/Phi-3-vision-128k-instruct", models="llava-hf/llava-1.5-7b-hf,/models/tiny-phi3v")


def job(**fields) -> Job:
    return build_job(JobRequest(task="describe", images=["cat.png"], **fields), SETTINGS)


def test_the_default_patterns_take_the_phi3_vision_checkpoints_by_name_only():
    for name in ("microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct",
                 "/models/phi-3.5-vision-instruct"):
        assert takes_num_crops(SETTINGS, name), name
    for name in ("llava-hf/llava-1.5-7b-hf", "microsoft/Phi-3-mini-4k-instruct", "/models/tiny-phi3v"):
        assert not takes_num_crops(SETTINGS, name), name
    assert takes_num_crops(SETTINGS.model_copy(update={"num_crops_models": ["*/tiny-phi3v"]}), "/models/tiny-phi3v")


@pytest.mark.parametrize("crops", [1, 4, 16])
def test_a_phi3_vision_job_keeps_its_num_crops_in_the_stored_job(crops):
    made = job(num_crops=crops)
    assert made.num_crops == crops
    assert Job.from_hash(made.to_hash()).num_crops == crops
    assert made.public()["num_crops"] == crops


def test_without_num_crops_the_job_has_none_and_the_worker_uses_the_models_setting():
    made = job()
    assert made.num_crops is None and "num_crops" not in made.public()


@pytest.mark.parametrize("crops", [0, -1, 17, 1000])
def test_num_crops_out_of_range_is_refused_with_its_own_code(crops):
    with pytest.raises(InvalidNumCrops) as refused:
        job(num_crops=crops)
    assert refused.value.code == "invalid_num_crops" and refused.value.http_status == 422


@pytest.mark.parametrize("model", ["llava-hf/llava-1.5-7b-hf", "/models/tiny-phi3v"])
def test_a_model_that_does_not_take_num_crops_refuses_it(model):
    with pytest.raises(NumCropsUnsupported) as refused:
        job(num_crops=4, model=model)
    assert refused.value.code == "num_crops_unsupported" and refused.value.http_status == 422
    assert model in refused.value.message
    assert job(model=model).num_crops is None  # the same job without it is taken


@pytest.mark.parametrize("value", ["4", 4.0, True, None])
def test_num_crops_must_be_an_integer(value):
    if value is None:
        assert JobRequest(task="describe", images=["x.png"], num_crops=None).num_crops is None
        return
    with pytest.raises(ValidationError):  # the API answers invalid_request for a mistyped field
        JobRequest.model_validate({"task": "describe", "images": ["x.png"], "num_crops": value})


def test_a_batch_checks_its_num_crops_against_its_model_or_leaves_that_to_its_lines():
    from shared.batches.batch import BatchRequest
    from shared.batches.intake import check_defaults

    lines = [{"custom_id": "a", "images": ["x.png"]}]
    assert check_defaults(BatchRequest(requests=lines, num_crops=16), SETTINGS).num_crops == 16
    with pytest.raises(InvalidNumCrops):
        check_defaults(BatchRequest(requests=lines, num_crops=17), SETTINGS)
    with pytest.raises(NumCropsUnsupported):
        check_defaults(BatchRequest(requests=lines, num_crops=4, model="llava-hf/llava-1.5-7b-hf"), SETTINGS)
