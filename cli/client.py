"""A thin client of the HTTP API, used by the CLI and the demo."""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
BATCH_TERMINAL_STATUSES = frozenset({"completed", "failed", "canceled"})


def batch_ended(batch: dict) -> bool:
    """Whether every item of the batch has ended (a canceled batch ends once its running items have stopped)."""
    return batch["status"] in BATCH_TERMINAL_STATUSES and "finished_at" in batch


class ApiError(Exception):
    """The API answered with an error body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def file_to_data_uri(path: Path) -> str:
    """Inline a local image file, so that a remote API can take it."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_arg_to_ref(arg: str) -> str:
    """A CLI image argument as a ref: an existing local file is inlined, anything else is passed as is."""
    path = Path(arg)
    return file_to_data_uri(path) if "://" not in arg and path.is_file() else arg


def file_parts(files: list[bytes]) -> list[tuple]:
    """Image bytes as the file parts of a multipart body, in order."""
    return [("file", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(files)]


class Client:
    """Submit jobs and read them back."""

    def __init__(self, base_url: str, key: str | None = None, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = requests.Session()
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"

    def submit(self, task: str, images: list[str], question: str | None = None,
               max_new_tokens: int | None = None, idempotency_key: str | None = None,
               webhook: dict | None = None, model: str | None = None, priority: str | None = None,
               start_within_s: float | None = None, num_crops: int | None = None) -> dict:
        """POST /v1/jobs; returns the queued job (the same one again for a repeated idempotency key)."""
        options = {"question": question, "max_new_tokens": max_new_tokens, "model": model, "webhook": webhook,
                   "priority": priority, "start_within_s": start_within_s, "num_crops": num_crops}
        body = {"task": task, "images": images, **{k: v for k, v in options.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._send("POST", "/v1/jobs", json=body, headers=headers)

    def submit_files(self, task: str, files: list[bytes], question: str | None = None,
                     max_new_tokens: int | None = None, idempotency_key: str | None = None) -> dict:
        """POST /v1/jobs as multipart, the images inline."""
        form = {k: v for k, v in {"task": task, "question": question, "max_new_tokens": max_new_tokens}.items()
                if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._send("POST", "/v1/jobs", data=form, files=file_parts(files), headers=headers)

    def upload(self, files: list[bytes]) -> list[dict]:
        """POST /v1/uploads: store images for later jobs; returns their `upload://` refs, sizes and expiry."""
        return self._send("POST", "/v1/uploads", files=file_parts(files))["uploads"]

    def cancel(self, job_id: str) -> dict:
        """POST /v1/jobs/<id>/cancel."""
        return self._send("POST", f"/v1/jobs/{job_id}/cancel")

    def deliveries(self, job_id: str) -> list[dict]:
        """GET /v1/jobs/<id>/deliveries: the job's webhook deliveries and their attempts."""
        return self._send("GET", f"/v1/jobs/{job_id}/deliveries")["deliveries"]

    def retry_delivery(self, job_id: str, delivery_id: str) -> dict:
        """POST /v1/jobs/<id>/deliveries/<delivery>/retry."""
        return self._send("POST", f"/v1/jobs/{job_id}/deliveries/{delivery_id}/retry")

    def add_webhook(self, url: str, events: list[str] | None = None) -> dict:
        """POST /v1/webhooks: the endpoint, with its signing secret (shown this once)."""
        return self._send("POST", "/v1/webhooks", json={"url": url, **({"events": events} if events else {})})

    def webhooks(self) -> list[dict]:
        """GET /v1/webhooks."""
        return self._send("GET", "/v1/webhooks")["endpoints"]

    def delete_webhook(self, endpoint_id: str) -> None:
        """DELETE /v1/webhooks/<id>."""
        self._send("DELETE", f"/v1/webhooks/{endpoint_id}")

    def webhook_secret(self) -> str:
        """GET /v1/webhooks/secret: the secret that signs the events of jobs' own webhooks."""
        return self._send("GET", "/v1/webhooks/secret")["secret"]

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        """GET /v1/jobs: one page of the caller's jobs, newest first."""
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._send("GET", "/v1/jobs", params=params)

    def get(self, job_id: str, wait_s: float = 0) -> dict:
        """GET /v1/jobs/<id>, holding up to `wait_s` seconds for the job to end."""
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        return self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=self.timeout_s + wait_s)

    def wait(self, job_id: str, timeout_s: float = 300.0) -> dict:
        """The job once it has ended (or as it stands when `timeout_s` runs out)."""
        deadline = time.monotonic() + timeout_s
        job = self.get(job_id)
        while job["status"] not in TERMINAL_STATUSES and time.monotonic() < deadline:
            job = self.get(job_id, wait_s=min(60.0, max(0.1, deadline - time.monotonic())))
        return job

    # --- batches ----------------------------------------------------------------------------------------------

    def upload_jsonl(self, source: Path | bytes) -> dict:
        """POST /v1/uploads of a JSONL file (streamed from disk), a batch's input_file; its `upload://` ref."""
        headers = {"Content-Type": "application/jsonl"}
        if isinstance(source, bytes):
            return self._send("POST", "/v1/uploads", data=source, headers=headers)["uploads"][0]
        with Path(source).open("rb") as stream:
            return self._send("POST", "/v1/uploads", data=stream, headers=headers, retries=1,
                              timeout=max(self.timeout_s, 600))["uploads"][0]

    def create_batch(self, *, input_file: str | None = None, requests: list[dict] | None = None,
                     images: str | None = None, idempotency_key: str | None = None, **options) -> dict:
        """POST /v1/batches with one input (an upload:// or s3:// JSONL file, inline requests, or an s3:// prefix
        of images) and options (task, question, max_new_tokens, model, priority, webhook, strict)."""
        inputs = {"input_file": input_file, "requests": requests, "images": images}
        body = {k: v for k, v in {**inputs, **options}.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._send("POST", "/v1/batches", json=body, headers=headers)

    def batch(self, batch_id: str) -> dict:
        """GET /v1/batches/<id>: status, counts by job status, progress, timestamps, ETA."""
        return self._send("GET", f"/v1/batches/{batch_id}")

    def batches(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        """GET /v1/batches: one page of the caller's batches, newest first."""
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._send("GET", "/v1/batches", params=params)

    def cancel_batch(self, batch_id: str) -> dict:
        """POST /v1/batches/<id>/cancel."""
        return self._send("POST", f"/v1/batches/{batch_id}/cancel")

    def retry_batch(self, batch_id: str) -> dict:
        """POST /v1/batches/<id>/retry: a new attempt for the items that failed."""
        return self._send("POST", f"/v1/batches/{batch_id}/retry")

    def batch_deliveries(self, batch_id: str) -> list[dict]:
        """GET /v1/batches/<id>/deliveries: the webhook deliveries of the batch's end."""
        return self._send("GET", f"/v1/batches/{batch_id}/deliveries")["deliveries"]

    def batch_results(self, batch_id: str) -> Iterator[dict]:
        """GET /v1/batches/<id>/results, streamed: one dict per item."""
        return self._lines(f"/v1/batches/{batch_id}/results")

    def batch_errors(self, batch_id: str) -> Iterator[dict]:
        """GET /v1/batches/<id>/errors, streamed: one dict per refused line."""
        return self._lines(f"/v1/batches/{batch_id}/errors")

    def save_batch_file(self, batch_id: str, which: str, path: Path) -> int:
        """Write the batch's results (or errors) file to `path` as it streams (through a temporary file, so that
        a broken download never leaves half a file); how many lines."""
        partial, lines = path.with_name(path.name + ".partial"), 0
        with self._stream(f"/v1/batches/{batch_id}/{which}") as response, partial.open("wb") as out:
            for line in response.iter_lines():
                if line:
                    out.write(line + b"\n")
                    lines += 1
        partial.replace(path)
        return lines

    def wait_batch(self, batch_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0,
                   progress: Callable[[dict], None] | None = None) -> dict:
        """The batch once it has ended (or as it stands when `timeout_s` runs out), calling `progress` on each
        poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self.batch(batch_id)
            if progress is not None:
                progress(batch)
            if batch_ended(batch) or time.monotonic() >= deadline:
                return batch
            time.sleep(poll_s)

    def _lines(self, path: str) -> Iterator[dict]:
        with self._stream(path) as response:
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    @contextmanager
    def _stream(self, path: str) -> Iterator[requests.Response]:
        response = self.http.get(self.base_url + path, stream=True, timeout=self.timeout_s)
        try:
            if not response.ok:
                self._answer(response)
            yield response
        finally:
            response.close()

    def _send(self, method: str, path: str, retries: int = 5, **kwargs) -> dict:
        """One request; a rate-limited one (429 with Retry-After) is retried after that delay, a few times.
        A 429 without it (queue_full) is the caller's to handle."""
        kwargs.setdefault("timeout", self.timeout_s)
        for _ in range(retries):
            response = self.http.request(method, self.base_url + path, **kwargs)
            if response.status_code != 429 or "Retry-After" not in response.headers:
                break
            time.sleep(min(30.0, float(response.headers["Retry-After"])))
        return self._answer(response)

    @staticmethod
    def _answer(response: requests.Response) -> dict:
        if response.status_code == 204:
            return {}
        try:
            body = response.json()
        except ValueError:
            raise ApiError(response.status_code, "bad_response", response.text[:200]) from None
        if not response.ok:
            error = body.get("error", {})
            raise ApiError(response.status_code, error.get("code", "unknown"), error.get("message", ""))
        return body
