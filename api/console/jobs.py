"""The console's jobs: the list (status filter, search by id, pages), a job's page with its images, result,
timings, queue place and webhook deliveries, the cancel and retry buttons, and the submit form. Submitting,
cancelling and retrying run the JSON API's own view code (api/jobs.py, api/deliveries.py)."""

from __future__ import annotations

import json

from flask import Response, g, redirect, request, url_for
from werkzeug.datastructures import MultiDict

from api import deliveries
from api import jobs as api_jobs
from api.auth import charge_now, check_rate
from api.console.blueprint import bp, page
from api.context import services
from shared.errors import NotFound, VisionqError
from shared.images.decode import open_image
from shared.images.refs import Access, held_bytes, ref_kind
from shared.jobs import Job, JobStatus
from shared.tasks import TASKS

NOTICES = {"canceled": "The job was canceled.", "retried": "The delivery will be sent again now.",
           "submitted": "The job was accepted."}
# What a browser may be told an image is; anything else (TIFF) is offered as a download, never sniffed.
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "GIF": "image/gif",
               "WEBP": "image/webp", "BMP": "image/bmp"}
FORM_FIELDS = ("task", "question", "max_new_tokens", "model")


@bp.get("/")
def home():
    return redirect(url_for("console.job_list"))


@bp.get("/jobs")
def job_list():
    """The key's jobs, newest first (an admin may pass ?owner= for another key's)."""
    svc = services()
    charge_now()
    wanted = request.args.get("q", "").strip()
    if wanted:
        job = svc.store.get(wanted)
        if job is not None and visible(job):
            return redirect(url_for("console.job_page", job_id=job.id))
    status, limit, before = api_jobs.list_parameters(svc.settings)
    owner = listed_owner()
    found, next_before = svc.store.list_jobs(owner, status, limit, before)
    cursor = api_jobs.encode_cursor(next_before) if next_before is not None else None
    return page("jobs.html", jobs=found, status=status.value if status else "", statuses=list(JobStatus),
                cursor=cursor, owner=owner, searched=wanted)


def listed_owner() -> str:
    """Whose jobs a list shows: the caller's, or for an admin key the one in ?owner=."""
    owner = request.args.get("owner", "").strip()
    return owner if owner and g.key.admin else g.key.id


def visible(job: Job) -> bool:
    """The caller's own job, or any job for an admin key."""
    return job.owner == g.key.id or g.key.admin


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    """A job as it stands, with its place in the queue while it waits."""
    svc = services()
    wait_s, job = svc.store.charged_get(job_id, g.charge)
    check_rate(wait_s)
    if job is None or not visible(job):
        raise NotFound(api_jobs.NOT_FOUND_MESSAGE)
    images = [image_entry(job, index, ref) for index, ref in enumerate(job.images)]
    return page("job.html", job=job, images=images, deliveries=svc.hooks.deliveries(job.id),
                own=job.owner == g.key.id, notice=NOTICES.get(request.args.get("notice", "")))


def image_entry(job: Job, index: int, ref: str) -> dict:
    """How the page shows one image: inline (held here), a link (a web URL, never fetched here) or its name."""
    try:
        kind = ref_kind(ref)
    except VisionqError:
        kind = "other"
    if kind in ("upload", "data"):
        return {"kind": kind, "src": url_for("console.job_image", job_id=job.id, index=index)}
    if kind == "url":
        return {"kind": kind, "href": ref}
    return {"kind": kind, "name": ref}


@bp.get("/jobs/<job_id>/images/<int:index>")
def job_image(job_id: str, index: int):
    """The bytes of an upload or data URI of the job, as the image type its header says, sandboxed."""
    svc = services()
    charge_now()
    job = svc.store.get(job_id)
    if job is None or not visible(job) or not 0 <= index < len(job.images):
        raise NotFound("no such image")
    data = held_bytes(job.images[index], svc.settings, Access(job.owner, frozenset(), svc.uploads))
    mimetype = IMAGE_TYPES.get(open_image(data, svc.settings).format or "")
    response = Response(data, mimetype=mimetype or "application/octet-stream")
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response.headers["Cache-Control"] = "private, max-age=300"
    if mimetype is None:
        response.headers["Content-Disposition"] = f'attachment; filename="{job.id}-{index}"'
    return response


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):
    api_jobs.cancel_job(job_id)
    return redirect(url_for("console.job_page", job_id=job_id, notice="canceled"), code=303)


@bp.post("/jobs/<job_id>/deliveries/<delivery_id>/retry")
def retry_delivery(job_id: str, delivery_id: str):
    deliveries.retry_delivery(job_id, delivery_id)
    return redirect(url_for("console.job_page", job_id=job_id, notice="retried"), code=303)


@bp.get("/submit")
def submit_form(error: VisionqError | None = None, status: int = 200):
    """The form: a task, a model, an optional question and token bound, the image files."""
    settings = services().settings
    html = page("submit.html", tasks=list(TASKS), models=settings.served_models, error=error,
                max_tokens=settings.max_new_tokens_limit, form=request.form)
    return html, status


@bp.post("/submit")
def submit():
    """The form's job through POST /v1/jobs's own code (api.jobs.admit); its page once accepted."""
    # Only the job's fields, and only those filled in: an empty question means the task's default.
    fields = MultiDict([(name, request.form[name]) for name in FORM_FIELDS if request.form.get(name, "").strip()])
    try:
        accepted = api_jobs.admit(fields)
    except VisionqError as exc:
        return submit_form(error=exc, status=exc.http_status)
    job_id = json.loads(accepted.get_data())["id"]
    return redirect(url_for("console.job_page", job_id=job_id, notice="submitted"), code=303)
