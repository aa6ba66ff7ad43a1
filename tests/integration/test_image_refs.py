"""Image references end to end, through the API and the worker of the session stack: uploads (raw and multipart),
multipart jobs, https URLs from the test HTTP server (its address allowed through the stack's env), s3:// refs
from moto with a per-key bucket allowlist, and failures that end the job with their code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import boto3
import pytest
import requests

from cli.client import ApiError
from shared.jobs import Job, JobStatus, utcnow
from shared.outbound.s3 import parse_s3_uri
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from tests.http_server import Route
from tests.images import encode, png, random_image
from worker.archive import archive_result

GRANTED_BUCKET = "e2e-granted"


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(random_image(64, 48, seed=5), "PNG")


@pytest.fixture(scope="module")
def bucket(s3_server, photo) -> str:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=GRANTED_BUCKET)
    s3.put_object(Bucket=GRANTED_BUCKET, Key="photos/street.png", Body=photo)
    return GRANTED_BUCKET


def error_of(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_an_upload_is_usable_by_its_key_only(make_client, photo):
    owner, other = make_client(), make_client()
    [upload] = owner.upload([photo])
    assert upload["ref"].startswith("upload://") and upload["size"] == len(photo)
    job = owner.submit("describe", [upload["ref"]], max_new_tokens=4)
    assert owner.wait(job["id"], 60)["status"] == "succeeded"
    refused = error_of(lambda: other.submit("describe", [upload["ref"]]))
    assert (refused.status, refused.code) == (422, "image_not_found")


def test_a_raw_body_upload(api_url, make_client, photo):
    client = make_client()
    response = client.http.post(f"{api_url}/v1/uploads", data=photo, headers={"Content-Type": "image/png"},
                                timeout=10)
    assert response.status_code == 201
    assert response.json()["uploads"][0]["ref"].startswith("upload://")


@pytest.mark.parametrize(("files", "status", "code"), [
    ([b"plain text, not an image"], 422, "image_unsupported_format"),
    ([b""], 422, "image_unreadable"),
    ([png()] * 9, 422, "wrong_image_count"),
    ([png() + b"\0" * (11 * 1024 * 1024)], 422, "image_too_large"),
    ([b"\0" * (21 * 1024 * 1024)], 413, "payload_too_large"),
])
def test_bad_uploads_are_refused(make_client, files, status, code):
    refused = error_of(lambda: make_client().upload(files))
    assert (refused.status, refused.code) == (status, code)


def test_a_multipart_job_with_inline_images(make_client, photo):
    client = make_client()
    job = client.submit_files("compare", [photo, png(40, 30)], max_new_tokens=4)
    finished = client.wait(job["id"], 60)
    assert finished["status"] == "succeeded" and finished["image_count"] == 2
    again = error_of(lambda: client.submit_files("describe", [b"not an image"]))
    assert (again.status, again.code) == (422, "image_unsupported_format")
    for tokens, code in (("²", "invalid_request"), ("many", "invalid_request"), ("0", "max_new_tokens_out_of_range")):
        response = client.http.post(f"{client.base_url}/v1/jobs", data={"task": "describe", "max_new_tokens": tokens},
                                    files=[("file", ("a.png", png(), "image/png"))], timeout=10)
        assert (response.status_code, response.json()["error"]["code"]) == (422, code)


def test_a_repeated_multipart_job_with_an_idempotency_key_is_the_same_job(make_client, photo):
    client = make_client()
    first = client.submit_files("describe", [photo], max_new_tokens=2, idempotency_key="mp-1")
    again = client.submit_files("describe", [photo], max_new_tokens=2, idempotency_key="mp-1")
    assert again["id"] == first["id"]
    other = error_of(lambda: client.submit_files("describe", [png()], max_new_tokens=2, idempotency_key="mp-1"))
    assert other.code == "idempotency_conflict"


def test_an_https_style_url_from_an_allowed_server(client, http_server, photo):
    url = http_server.add("/e2e/photo.png", Route(photo))
    job = client.submit("describe", [url], max_new_tokens=4)
    assert client.wait(job["id"], 60)["status"] == "succeeded"


@pytest.mark.parametrize(("target", "code"), [
    ("http://169.254.169.254/latest/meta-data/", "image_forbidden_address"),
    ("http://[::1]/a.png", "image_forbidden_address"),
    ("http://2130706433/a.png", "invalid_image_ref"),
])
def test_a_redirect_to_a_forbidden_place_fails_the_job(client, http_server, target, code):
    url = http_server.redirect(f"/e2e/redirect/{abs(hash(target))}", target)
    job = client.submit("describe", [url])  # the URL itself is allowed: only the worker sees the redirect
    finished = client.wait(job["id"], 60)
    assert finished["status"] == "failed" and finished["error"]["code"] == code


@pytest.mark.parametrize(("url", "code"), [
    ("http://localhost/a.png", "image_forbidden_address"),
    ("http://127.0.0.1/a.png", "image_forbidden_address"),
    ("http://10.0.0.8/a.png", "image_forbidden_address"),
    ("http://0x7f.1/a.png", "invalid_image_ref"),
])
def test_a_forbidden_url_is_refused_at_submit(client, url, code):
    refused = error_of(lambda: client.submit("describe", [url]))
    assert (refused.status, refused.code) == (422, code)


def test_s3_refs_follow_the_keys_bucket_allowlist(make_client, bucket):
    granted, plain = make_client(s3_buckets=[bucket]), make_client()
    ref = f"s3://{bucket}/photos/street.png"
    job = granted.submit("describe", [ref], max_new_tokens=4)
    assert granted.wait(job["id"], 60)["status"] == "succeeded"
    refused = error_of(lambda: plain.submit("describe", [ref]))
    assert (refused.status, refused.code) == (422, "image_bucket_not_allowed")
    missing = granted.submit("describe", [f"s3://{bucket}/photos/none.png"])
    assert granted.wait(missing["id"], 60)["error"]["code"] == "image_not_found"


def test_keys_create_takes_s3_buckets(settings, stack):
    env = {**os.environ, "VISIONQ_REDIS_URL": settings.redis_url}
    out = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--name", "cli",
                          "--s3-buckets", "photos-a, photos-b"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    key_id = out.split()[2]
    assert KeyStore(connect(settings)).get(key_id).s3_buckets == ["photos-a", "photos-b"]
    listed = subprocess.run([sys.executable, "-m", "cli.main", "keys", "list"], env=env, capture_output=True,
                            text=True, check=True, timeout=60).stdout
    assert any(json.loads(line)["s3_buckets"] == ["photos-a", "photos-b"] for line in listed.splitlines())


def test_succeeded_jobs_are_archived_in_s3(client, settings, s3_server):
    job = client.submit("describe", ["bar_chart.png"], max_new_tokens=4)
    assert client.wait(job["id"], 60)["status"] == "succeeded"
    location = parse_s3_uri(f"{settings.results_s3_uri}/{job['id']}.json")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    deadline = time.monotonic() + 10
    while True:  # the worker archives just after it stores the result: poll, with a deadline
        try:
            archived = json.loads(s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read())
            break
        except s3.exceptions.NoSuchKey:
            assert time.monotonic() < deadline, "the result was not archived"
            time.sleep(0.05)
    assert archived == client.get(job["id"])


def test_a_failing_archive_never_touches_the_job(settings, s3_server, caplog):
    job = Job(id="0" * 32, status=JobStatus.SUCCEEDED, task="describe", image_count=1, question="q",
              max_new_tokens=1, created_at=utcnow())
    archive_result(job, settings.model_copy(update={"results_s3_uri": "s3://no-such-bucket-here/x"}))
    assert "not archived" in caplog.text


def test_uploads_need_a_key(api_url):
    response = requests.post(f"{api_url}/v1/uploads", data=png(), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 401
