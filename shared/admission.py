"""Admission: what makes a job request a queued job. The task, the server's bounds, each image ref (with the
SSRF guard and the caller's access), the model and the webhook are checked here, for POST /v1/jobs and for every
line of a batch alike (shared/batches/), so that both refuse exactly the same requests with the same codes."""

from __future__ import annotations

from shared.config import Settings
from shared.errors import (
    InvalidNumCrops,
    InvalidPriority,
    InvalidRequest,
    InvalidStartWithin,
    MaxNewTokensOutOfRange,
    NumCropsUnsupported,
    QuestionTooLong,
    UnknownTask,
    WrongImageCount,
)
from shared.images.refs import NO_ACCESS, Access, validate_ref
from shared.jobs import MAX_NUM_CROPS, PRIORITY_RANKS, Job, JobRequest, JobStatus, new_job_id, utcnow
from shared.routing import resolve_model, takes_num_crops
from shared.tasks import TASKS
from shared.webhooks.targets import check_webhook


def build_job(req: JobRequest, settings: Settings, access: Access = NO_ACCESS) -> Job:
    """Check the request against the task and the server's bounds, and make the queued job."""
    spec = TASKS.get(req.task)
    if spec is None:
        raise UnknownTask(f"task must be one of: {', '.join(TASKS)}")
    check_image_count(len(req.images), spec.min_images, spec.max_images or settings.max_images, settings)
    for ref in req.images:
        validate_ref(ref, settings, access)
    model = resolve_model(settings, req.model)
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        task=spec.name,
        images=req.images,
        image_count=len(req.images),
        question=spec.question_or_default(check_question(req.question, settings)),
        max_new_tokens=check_max_new_tokens(req.max_new_tokens, settings),
        model=model,
        created_at=utcnow(),
        webhook=check_webhook(req.webhook, settings) if req.webhook else None,
        priority=check_priority(req.priority),
        start_within_s=check_start_within(req.start_within_s, settings),
        num_crops=check_num_crops(req.num_crops, model, settings),
    )


def check_image_count(count: int, low: int, high: int, settings: Settings) -> None:
    high = min(high, settings.max_images)
    if not low <= count <= high:
        wanted = f"exactly {low}" if low == high else f"{low} to {high}"
        noun = "image" if low == high == 1 else "images"
        raise WrongImageCount(f"this task takes {wanted} {noun}, got {count}")


def check_question(question: str | None, settings: Settings) -> str | None:
    if question is None:
        return None
    if not question.strip():
        raise InvalidRequest("question must not be blank (leave it out to use the task's default)")
    if len(question) > settings.max_question_chars:
        raise QuestionTooLong(f"question is {len(question)} characters, over {settings.max_question_chars}")
    return question


def check_max_new_tokens(value: int | None, settings: Settings) -> int:
    if value is None:
        return min(settings.default_max_new_tokens, settings.max_new_tokens_limit)
    if not 1 <= value <= settings.max_new_tokens_limit:
        raise MaxNewTokensOutOfRange(f"max_new_tokens must be from 1 to {settings.max_new_tokens_limit}")
    return value


def check_num_crops(value: int | None, model: str | None, settings: Settings) -> int | None:
    """A job's num_crops: for a model that takes it (None: the model's own setting), from 1 to MAX_NUM_CROPS. With
    no model yet (a batch's defaults, checked before its lines name theirs), only the range is checked."""
    if value is None:
        return None
    if model is not None and not takes_num_crops(settings, model):
        raise NumCropsUnsupported(f"model {model} does not take num_crops (Phi-3-vision's option: the models "
                                  "that take it are set by VISIONQ_NUM_CROPS_MODELS)")
    if not 1 <= value <= MAX_NUM_CROPS:
        raise InvalidNumCrops(f"num_crops must be from 1 to {MAX_NUM_CROPS}")
    return value


def check_priority(priority: str | None) -> str:
    if priority is None:
        return "normal"
    if priority not in PRIORITY_RANKS:
        raise InvalidPriority(f"priority must be one of: {', '.join(PRIORITY_RANKS)}")
    return priority


def check_start_within(seconds: float | None, settings: Settings) -> float | None:
    """The job's start deadline in seconds after submission: its own, else the server's default (0: none)."""
    if seconds is None:
        return settings.default_start_within_s or None
    if not 0 < seconds <= settings.result_ttl_s:
        raise InvalidStartWithin(f"start_within_s must be more than 0 and at most {settings.result_ttl_s}")
    return float(seconds)
