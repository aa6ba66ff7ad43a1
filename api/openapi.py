"""GET /openapi.json: OpenAPI 3.1, built from the same pydantic models that validate and serialize requests.

Pydantic 2 emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is, so no framework sits between Flask and
the models (spectree, flask-openapi3 or apiflask would each bring their own request parsing and error shapes,
and the error contract here is ours, in api/errors.py).
"""

from __future__ import annotations

from flask import Blueprint, current_app
from pydantic import BaseModel

from api.context import services
from api.schemas import (
    BatchPage,
    DeliveryList,
    EndpointList,
    EndpointRequest,
    ErrorBody,
    JobPage,
    QueueList,
    SigningSecret,
    UploadList,
)
from shared.batches.batch import Batch, BatchRequest, BatchStatus
from shared.config import Settings
from shared.jobs import MAX_NUM_CROPS, Job, JobRequest, JobStatus
from shared.webhooks.endpoints import Delivery, Endpoint

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


@bp.get("/openapi.json")
def openapi_json():
    app = current_app
    if "openapi" not in app.extensions:  # built once per process
        app.extensions["openapi"] = openapi(services().settings)
    return app.extensions["openapi"]


def schemas(requests: list[type[BaseModel]], answers: list[type[BaseModel]]) -> dict:
    """Component schemas for the models and every model they use: requests as they are validated, answers
    as they are serialized (so that fields never sent, such as a job's image refs, are not described)."""
    found: dict = {}
    for model, mode in [(m, "validation") for m in requests] + [(m, "serialization") for m in answers]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def answer(description: str, model: type[BaseModel] | None = None, headers: dict | None = None) -> dict:
    body = {"description": description}
    if model is not None:
        body["content"] = {"application/json": {"schema": ref(model)}}
    if headers:
        body["headers"] = headers
    return body


def errors(*statuses: int) -> dict:
    texts = {400: "malformed request or parameter", 401: "missing or unknown API key", 404: "no such job or batch",
             409: "the job has already ended (webhooks: too many endpoints, or a delivery under way; batches: "
                  "already ended, not finished, not retryable or nothing to retry)",
             413: "body too large", 415: "body is not JSON",
             422: "invalid request (codes: invalid_request, invalid_priority, invalid_start_within, ...)",
             429: "rate limited or too many active jobs", 503: "store unavailable"}
    return {str(s): answer(texts[s], ErrorBody) for s in statuses}


def openapi(settings: Settings) -> dict:
    """The whole document (bounds come from the settings, so it says what this server accepts)."""
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    location = {"Location": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "visionq", "version": "1", "description": "Vision-language jobs: describe, OCR, compare."},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "maxLength": 256}}],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": ref(JobRequest)},
                        "multipart/form-data": {"schema": multipart_job(settings)}}},
                    "responses": {"202": answer("accepted (or the job an earlier identical request made)", Job,
                                                location),
                                  **errors(400, 401, 413, 415, 422, 429, 503)},
                },
                "get": {
                    "summary": "List the caller's jobs, newest first",
                    "parameters": list_parameters(settings),
                    "responses": {"200": answer("a page of jobs", JobPage), **errors(400, 401, 429, 503)},
                },
            },
            "/v1/jobs/{job_id}": {"get": {
                "summary": "Read a job, optionally waiting for it to end",
                "parameters": [job_id, {"name": "wait", "in": "query", "required": False,
                                        "schema": {"type": "number", "minimum": 0, "maximum": settings.max_wait_s}}],
                "responses": {"200": answer("the job", Job), **errors(400, 401, 404, 429, 503)},
            }},
            "/v1/jobs/{job_id}/cancel": {"post": {
                "summary": "Cancel a queued or running job",
                "parameters": [job_id],
                "responses": {"200": answer("the canceled job", Job), **errors(401, 404, 409, 429, 503)},
            }},
            "/v1/uploads": {"post": {
                "summary": "Store images for later jobs of the same key (upload://<id> refs), or one JSONL file "
                           "(a batch's input_file)",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
                        "type": "array", "maxItems": settings.max_images,
                        "items": {"type": "string", "format": "binary"}}}}},
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/jsonl": {"schema": {"type": "string", "format": "binary",
                                                     "maxLength": settings.batch_max_input_bytes}}}},
                "responses": {"201": answer("stored", UploadList), **errors(400, 401, 413, 415, 422, 429, 503)},
            }},
            "/v1/queues": {"get": {
                "summary": "Each model's queue: jobs queued (all keys', and the caller's waiting), live and starting "
                           "workers, jobs/s over the last minute",
                "responses": {"200": answer("the queues", QueueList), **errors(401, 429, 503)}}},
            **webhook_paths(job_id),
            **batch_paths(settings),
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": answer("up")}}},
            "/readyz": {"get": {"summary": "Readiness: Redis and a live worker", "security": [],
                                "responses": {"200": answer("ready"), "503": answer("not ready, with the reason")}}},
        },
        "components": {
            "schemas": schemas([JobRequest, EndpointRequest, BatchRequest],
                               [Job, JobPage, ErrorBody, UploadList, Delivery, DeliveryList, Endpoint, EndpointList,
                                SigningSecret, Batch, BatchPage, QueueList]),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def multipart_job(settings: Settings) -> dict:
    """POST /v1/jobs as a form: the JSON fields, then image files after the `images` refs."""
    return {"type": "object", "required": ["task"], "properties": {
        "task": {"type": "string"}, "question": {"type": "string"},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit},
        "num_crops": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_CROPS},
        "images": {"type": "array", "items": {"type": "string"}},
        "file": {"type": "array", "maxItems": settings.max_images, "items": {"type": "string", "format": "binary"}},
    }}


def webhook_paths(job_id: dict) -> dict:
    """The webhook endpoints of a key, and the deliveries of a job."""
    delivery_id = {"name": "delivery_id", "in": "path", "required": True, "schema": {"type": "string"}}
    endpoint_id = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/jobs/{job_id}/deliveries": {"get": {
            "summary": "The job's webhook deliveries, each with its attempts",
            "parameters": [job_id],
            "responses": {"200": answer("the deliveries", DeliveryList), **errors(401, 404, 429, 503)},
        }},
        "/v1/jobs/{job_id}/deliveries/{delivery_id}/retry": {"post": {
            "summary": "Send a delivery again now (same event, same webhook-id)",
            "parameters": [job_id, delivery_id],
            "responses": {"202": answer("the delivery, pending", Delivery), **errors(401, 404, 409, 429, 503)},
        }},
        "/v1/webhooks": {
            "post": {
                "summary": "Register a webhook endpoint for this key's jobs; its secret is shown this once",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": ref(EndpointRequest)}}},
                "responses": {"201": answer("the endpoint, with its secret", Endpoint),
                              **errors(400, 401, 409, 413, 415, 422, 429, 503)},
            },
            "get": {"summary": "This key's webhook endpoints",
                    "responses": {"200": answer("the endpoints", EndpointList), **errors(401, 429, 503)}},
        },
        "/v1/webhooks/{endpoint_id}": {"delete": {
            "summary": "Remove a webhook endpoint",
            "parameters": [endpoint_id],
            "responses": {"204": answer("removed"), **errors(401, 404, 429, 503)},
        }},
        "/v1/webhooks/secret": {"get": {
            "summary": "The secret that signs events sent to jobs' own webhook URLs",
            "responses": {"200": answer("the secret", SigningSecret), **errors(401, 429, 503)},
        }},
    }


def batch_paths(settings: Settings) -> dict:
    """The batches resource."""
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    jsonl = {"application/jsonl": {"schema": {"type": "string", "description": "one JSON object per line"}}}
    idempotency = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "maxLength": 256}}
    return {
        "/v1/batches": {
            "post": {
                "summary": "Submit a batch: one job per line of a JSONL input, or per image under an S3 prefix",
                "parameters": [idempotency],
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref(BatchRequest)}}},
                "responses": {"202": answer("accepted (status validating); its lines are admitted in the background",
                                            Batch, {"Location": {"schema": {"type": "string"}}}),
                              **errors(400, 401, 413, 415, 422, 429, 503)},
            },
            "get": {
                "summary": "List the caller's batches, newest first",
                "parameters": list_parameters(settings, BatchStatus),
                "responses": {"200": answer("a page of batches", BatchPage), **errors(400, 401, 429, 503)},
            },
        },
        "/v1/batches/{batch_id}": {"get": {
            "summary": "Read a batch: status, counts by job status, progress, ETA",
            "parameters": [batch_id],
            "responses": {"200": answer("the batch", Batch), **errors(401, 404, 429, 503)},
        }},
        "/v1/batches/{batch_id}/results": {"get": {
            "summary": "The results file: one line per item (custom_id, id, status, result or error), streamed",
            "parameters": [batch_id],
            "responses": {"200": {"description": "JSON lines", "content": jsonl}, **errors(401, 404, 429, 503)},
        }},
        "/v1/batches/{batch_id}/errors": {"get": {
            "summary": "The errors file: one line per refused line (line, custom_id, error), streamed",
            "parameters": [batch_id],
            "responses": {"200": {"description": "JSON lines", "content": jsonl}, **errors(401, 404, 429, 503)},
        }},
        "/v1/batches/{batch_id}/cancel": {"post": {
            "summary": "Cancel a batch: queued items are canceled, running ones stop at their next step",
            "parameters": [batch_id],
            "responses": {"200": answer("the canceled batch", Batch), **errors(401, 404, 409, 429, 503)},
        }},
        "/v1/batches/{batch_id}/retry": {"post": {
            "summary": "A new attempt for the items that failed (same custom_ids)",
            "parameters": [batch_id],
            "responses": {"202": answer("the batch, in progress again", Batch), **errors(401, 404, 409, 429, 503)},
        }},
        "/v1/batches/{batch_id}/deliveries": {"get": {
            "summary": "The webhook deliveries of the batch's end, each with its attempts",
            "parameters": [batch_id],
            "responses": {"200": answer("the deliveries", DeliveryList), **errors(401, 404, 429, 503)},
        }},
    }


def list_parameters(settings: Settings, statuses: type = JobStatus) -> list[dict]:
    return [
        {"name": "status", "in": "query", "required": False,
         "schema": {"type": "string", "enum": [s.value for s in statuses]}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": settings.list_max_limit, "default": 20}},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
