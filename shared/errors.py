"""A small tree of errors, each with a stable code; the API maps them to HTTP statuses in one handler."""

from __future__ import annotations


class VisionqError(Exception):
    """Base of every error visionq reports to a user."""

    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(self, message: str | None = None, *, details: list | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message or self.__doc__)
        self.message = message or (self.__doc__ or self.code)
        self.details = details
        self.headers = headers or {}

    def to_dict(self) -> dict:
        """The `{"code", "message"}` body users see."""
        body = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


# --- Malformed requests (400, 413, 415) ------------------------------------------------------------------------


class InvalidJson(VisionqError):
    """The request body is not valid JSON."""

    code, http_status = "invalid_json", 400


class InvalidParameter(VisionqError):
    """A query parameter is malformed or out of range."""

    code, http_status = "invalid_parameter", 400


class UnsupportedMediaType(VisionqError):
    """The request body must be JSON (Content-Type: application/json)."""

    code, http_status = "unsupported_media_type", 415


class PayloadTooLarge(VisionqError):
    """The request body is larger than the server accepts."""

    code, http_status = "payload_too_large", 413


# --- Job requests the server refuses (422) ---------------------------------------------------------------------


class InvalidRequest(VisionqError):
    """The request does not have the expected fields and types."""

    code, http_status = "invalid_request", 422


class UnknownTask(InvalidRequest):
    """The task is not one of the tasks this server runs."""

    code = "unknown_task"


class WrongImageCount(InvalidRequest):
    """The task takes a different number of images."""

    code = "wrong_image_count"


class QuestionTooLong(InvalidRequest):
    """The question is longer than the server accepts."""

    code = "question_too_long"


class MaxNewTokensOutOfRange(InvalidRequest):
    """max_new_tokens is outside the allowed range."""

    code = "max_new_tokens_out_of_range"


class InvalidImageRef(InvalidRequest):
    """An image reference is malformed, unsupported or outside what this server may read."""

    code = "invalid_image_ref"


class UnknownModel(InvalidRequest):
    """The model is not one of the models this server is configured to serve."""

    code = "unknown_model"


class InvalidPriority(InvalidRequest):
    """The priority is not high, normal or low."""

    code = "invalid_priority"


class InvalidStartWithin(InvalidRequest):
    """start_within_s is not a positive number of seconds within the server's bound."""

    code = "invalid_start_within"


class InvalidNumCrops(InvalidRequest):
    """num_crops is not a whole number of crops from 1 to 16."""

    code = "invalid_num_crops"


class NumCropsUnsupported(InvalidRequest):
    """num_crops is Phi-3-vision's option; the job's model does not take it."""

    code = "num_crops_unsupported"


class IdempotencyConflict(InvalidRequest):
    """This Idempotency-Key was already used with a different request body."""

    code = "idempotency_conflict"


# --- Who may do what, and how much (401, 404, 409, 429) --------------------------------------------------------


class Unauthorized(VisionqError):
    """A valid API key is required: Authorization: Bearer <key>."""

    code, http_status = "unauthorized", 401


class CsrfRejected(VisionqError):
    """A console form must come from the console's own page, with its session's token."""

    code, http_status = "csrf_rejected", 403


class NotFound(VisionqError):
    """No such resource (or it has expired)."""

    code, http_status = "not_found", 404


class AlreadyFinished(VisionqError):
    """The job has already ended and cannot be canceled."""

    code, http_status = "already_finished", 409


class RateLimited(VisionqError):
    """Too many requests for this API key; retry after the time in Retry-After."""

    code, http_status = "rate_limited", 429


class QueueFull(VisionqError):
    """This API key has as many jobs queued or running as it may; submit again when some have ended."""

    code, http_status = "queue_full", 429


class UploadQuotaExceeded(VisionqError):
    """This API key has stored as many upload bytes as it may; retry when earlier uploads have expired."""

    code, http_status = "upload_quota_exceeded", 429


# --- Webhooks (400, 409, 422) ----------------------------------------------------------------------------------


class WebhookUrlRefused(VisionqError):
    """The webhook URL is malformed or may not be reached (SSRF guard: https, public addresses only)."""

    code, http_status = "invalid_webhook_url", 400


class InvalidWebhookEvents(InvalidRequest):
    """The webhook's events must be a non-empty list of job.succeeded, job.failed, job.canceled."""

    code = "invalid_webhook_events"


class TooManyEndpoints(VisionqError):
    """This API key has registered as many webhook endpoints as it may; delete one first."""

    code, http_status = "too_many_endpoints", 409


class DeliveryInProgress(VisionqError):
    """This delivery is being attempted right now; it will be retried if the attempt fails."""

    code, http_status = "delivery_in_progress", 409


# --- Batches (422, 409) ---------------------------------------------------------------------------------------


class InvalidBatchInput(InvalidRequest):
    """A batch needs exactly one input: input_file (upload:// or s3://), requests, or images (an s3:// prefix)."""

    code = "invalid_input"


class InputNotFound(InvalidRequest):
    """The batch's input file does not exist, has expired, or belongs to another API key."""

    code = "input_not_found"


class InputBucketNotAllowed(InvalidRequest):
    """The batch's input is in an S3 bucket this API key may not read."""

    code = "input_bucket_not_allowed"


class TooManyItems(InvalidRequest):
    """The batch holds more items than the server accepts in one batch."""

    code = "too_many_items"


class InvalidLines(InvalidRequest):
    """Lines of a strict batch were refused, so the whole batch is: see its errors file."""

    code = "invalid_lines"


class BatchNotFinished(VisionqError):
    """The batch is still running: retry its failed items once it has completed."""

    code, http_status = "batch_not_finished", 409


class NotRetryable(VisionqError):
    """Only a completed batch can retry its failed items (a canceled or failed one cannot)."""

    code, http_status = "not_retryable", 409


class NothingToRetry(VisionqError):
    """No item of the batch has failed."""

    code, http_status = "nothing_to_retry", 409


# --- Images that end a job failed (also found at submit, as 422) -----------------------------------------------


class ImageError(VisionqError):
    """An image of the job could not be used."""

    code, http_status = "image_unreadable", 422


class ImageNotFound(ImageError):
    """An image of the job does not exist."""

    code = "image_not_found"


class ImageTooLarge(ImageError):
    """An image of the job is larger than allowed, in bytes or pixels."""

    code = "image_too_large"


class ImageUnreadable(ImageError):
    """An image of the job could not be read or decoded."""

    code = "image_unreadable"


class ImageFetchFailed(ImageError):
    """An image of the job could not be fetched (timeout, connection error, or an error from its server)."""

    code = "image_fetch_failed"


class ImageForbiddenAddress(ImageError):
    """An image URL is, resolves to or redirects to an address that may not be reached (SSRF guard)."""

    code = "image_forbidden_address"


class ImageBucketNotAllowed(ImageError):
    """An s3:// image is in a bucket this API key may not read."""

    code = "image_bucket_not_allowed"


class ImageUnsupportedFormat(ImageError):
    """An image is not in an accepted format (PNG, JPEG, WebP, GIF, BMP, TIFF), or was served as a non-image."""

    code = "image_unsupported_format"


class ImageDecompressionBomb(ImageError):
    """An image declares more pixels than allowed: decoding it would take too much memory."""

    code = "image_decompression_bomb"


# --- Other ends of a job ---------------------------------------------------------------------------------------


class WorkerLost(VisionqError):
    """The job was interrupted more times than allowed (its worker died while running it)."""

    code = "worker_lost"


class DeadlineExceeded(VisionqError):
    """The job did not start within its start_within_s (it never ran)."""

    code = "deadline_exceeded"


class InferenceFailed(VisionqError):
    """The model failed to run on this job."""

    code = "inference_failed"
