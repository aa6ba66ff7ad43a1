"""The console's batches: the list, and a batch's page with progress bars from its counts, its results and
errors files, and the cancel and retry buttons (the JSON API's own view code: api/batches.py)."""

from __future__ import annotations

from flask import g, redirect, request, url_for

from api import batches as api_batches
from api import jobs as api_jobs
from api.auth import charge_now
from api.console.blueprint import bp, page
from api.context import services
from shared.batches.batch import BatchStatus

NOTICES = {"canceled": "The batch was canceled.", "retried": "Its failed items run again."}


@bp.get("/batches")
def batch_list():
    svc = services()
    charge_now()
    status, limit, before = api_jobs.list_parameters(svc.settings, BatchStatus)
    found, next_before = svc.batches.list(g.key.id, status, limit, before)
    cursor = api_jobs.encode_cursor(next_before) if next_before is not None else None
    return page("batches.html", batches=found, status=status.value if status else "", statuses=list(BatchStatus),
                cursor=cursor)


@bp.get("/batches/<batch_id>")
def batch_page(batch_id: str):
    charge_now()
    batch = api_batches.owned(batch_id)
    return page("batch.html", batch=batch, notice=NOTICES.get(request.args.get("notice", "")),
                deliveries=services().hooks.deliveries(batch.id))


@bp.get("/batches/<batch_id>/<any(results, errors):which>.jsonl")
def batch_file(batch_id: str, which: str):
    """The results or errors file, as the JSON API streams it, offered as a download."""
    view = api_batches.batch_results if which == "results" else api_batches.batch_errors
    response = view(batch_id)
    response.headers["Content-Disposition"] = f'attachment; filename="{batch_id}-{which}.jsonl"'
    return response


@bp.post("/batches/<batch_id>/cancel")
def batch_cancel(batch_id: str):
    api_batches.cancel_batch(batch_id)
    return redirect(url_for("console.batch_page", batch_id=batch_id, notice="canceled"), code=303)


@bp.post("/batches/<batch_id>/retry")
def batch_retry(batch_id: str):
    api_batches.retry_batch(batch_id)
    return redirect(url_for("console.batch_page", batch_id=batch_id, notice="retried"), code=303)
