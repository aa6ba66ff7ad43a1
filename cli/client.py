"""A thin client of the HTTP API, used by the CLI and the demo."""

from __future__ import annotations

import base64
import mimetypes
import time
from pathlib import Path

import requests

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


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
               webhook: dict | None = None, model: str | None = None) -> dict:
        """POST /v1/jobs; returns the queued job (the same one again for a repeated idempotency key)."""
        options = {"question": question, "max_new_tokens": max_new_tokens, "model": model, "webhook": webhook}
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
