"""The jobs resource: POST /v1/jobs submits, GET /v1/jobs/<id> reads (and can wait for the end)."""

from __future__ import annotations

from flask import Blueprint, request
from pydantic import ValidationError

from api.context import services
from shared.config import Settings
from shared.errors import (
    InvalidJson,
    InvalidParameter,
    InvalidRequest,
    MaxNewTokensOutOfRange,
    NotFound,
    QuestionTooLong,
    UnknownTask,
    UnsupportedMediaType,
    WrongImageCount,
)
from shared.images import validate_ref
from shared.jobs import Job, JobRequest, JobStatus, new_job_id, utcnow
from shared.task_specs import TASKS

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


@bp.post("")
def submit_job():
    """Accept a job: 202 with the queued job and its Location."""
    svc = services()
    job = build_job(parse_request(), svc.settings)
    svc.store.create(job, svc.settings.queue)
    return job.public(), 202, {"Location": f"/v1/jobs/{job.id}"}


@bp.get("/<job_id>")
def get_job(job_id: str):
    """The job as it stands, or once it ends when ?wait=<seconds> is given."""
    svc = services()
    wait = wait_seconds(svc.settings)
    job = svc.store.wait(job_id, wait) if wait else svc.store.get(job_id)
    if job is None:
        raise NotFound("no job with this id (it may have expired)")
    return job.public()


def parse_request() -> JobRequest:
    """The body as a JobRequest; malformed JSON and wrong shapes are told apart."""
    if not request.is_json:
        raise UnsupportedMediaType()
    try:
        return JobRequest.model_validate_json(request.get_data(cache=False))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise InvalidJson() from None
        details = [{"field": ".".join(map(str, err["loc"])), "message": err["msg"]} for err in errors]
        raise InvalidRequest("the request has missing, unknown or mistyped fields", details=details) from None


def build_job(req: JobRequest, settings: Settings) -> Job:
    """Check the request against the task and the server's bounds, and make the queued job."""
    spec = TASKS.get(req.task)
    if spec is None:
        raise UnknownTask(f"task must be one of: {', '.join(TASKS)}")
    check_image_count(len(req.images), spec.min_images, spec.max_images or settings.max_images, settings)
    for ref in req.images:
        validate_ref(ref, settings)
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        task=spec.name,
        images=req.images,
        image_count=len(req.images),
        question=spec.question_or_default(check_question(req.question, settings)),
        max_new_tokens=check_max_new_tokens(req.max_new_tokens, settings),
        created_at=utcnow(),
    )


def check_image_count(count: int, low: int, high: int, settings: Settings) -> None:
    high = min(high, settings.max_images)
    if not low <= count <= high:
        wanted = f"exactly {low}" if low == high else f"{low} to {high}"
        raise WrongImageCount(f"this task takes {wanted} images, got {count}")


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


def wait_seconds(settings: Settings) -> float:
    """The ?wait parameter, from 0 to settings.max_wait_s."""
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise InvalidParameter("wait must be a number of seconds") from None
    if not 0 <= wait <= settings.max_wait_s:
        raise InvalidParameter(f"wait must be from 0 to {settings.max_wait_s:g} seconds")
    return wait
