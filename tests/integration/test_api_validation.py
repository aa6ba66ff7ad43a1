"""Bad input over HTTP: every rejected request gets JSON {"error": {"code", "message"}} and the right status."""

from __future__ import annotations

import base64

import pytest
import requests

VALID_IMAGE = "bar_chart.png"


@pytest.fixture
def post(api_url, auth):
    def send(body=None, *, data=None, headers=None):
        return requests.post(f"{api_url}/v1/jobs", json=body, data=data, headers={**auth, **(headers or {})},
                             timeout=10)
    return send


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(("body", "code"), [
    ({"task": "summarize", "images": [VALID_IMAGE]}, "unknown_task"),
    ({"task": "describe"}, "invalid_request"),
    ({"task": "describe", "images": VALID_IMAGE}, "invalid_request"),
    ({"task": "describe", "images": [VALID_IMAGE], "max_new_tokens": "12"}, "invalid_request"),
    ({"task": "describe", "images": [VALID_IMAGE], "max_new_tokens": 1.5}, "invalid_request"),
    ({"task": "describe", "images": [VALID_IMAGE], "question": 7}, "invalid_request"),
    ({"task": "describe", "images": [VALID_IMAGE], "colour": "red"}, "invalid_request"),
    ({"task": 3, "images": [VALID_IMAGE]}, "invalid_request"),
    ({"task": "describe", "images": []}, "wrong_image_count"),
    ({"task": "describe", "images": [VALID_IMAGE, VALID_IMAGE]}, "wrong_image_count"),
    ({"task": "compare", "images": [VALID_IMAGE]}, "wrong_image_count"),
    ({"task": "compare", "images": [VALID_IMAGE] * 9}, "wrong_image_count"),
    ({"task": "describe", "images": [VALID_IMAGE], "question": "x" * 2001}, "question_too_long"),
    ({"task": "describe", "images": [VALID_IMAGE], "question": "   "}, "invalid_request"),
    ({"task": "describe", "images": [VALID_IMAGE], "max_new_tokens": 0}, "max_new_tokens_out_of_range"),
    ({"task": "describe", "images": [VALID_IMAGE], "max_new_tokens": 1025}, "max_new_tokens_out_of_range"),
    ({"task": "describe", "images": ["../../etc/passwd"]}, "invalid_image_ref"),
    ({"task": "describe", "images": ["ftp://example.com/a.png"]}, "invalid_image_ref"),
    ({"task": "describe", "images": ["data:image/png;base64,***"]}, "invalid_image_ref"),
    ([1, 2, 3], "invalid_request"),
])
def test_invalid_bodies_are_rejected_with_a_code(post, body, code):
    assert_error(post(body), 422, code)


def test_malformed_json_is_400(post):
    response = post(data='{"task": "describe", ', headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json")


def test_non_json_body_is_415(post):
    assert_error(post(data="task=describe", headers={"Content-Type": "text/plain"}), 415,
                 "unsupported_media_type")


def test_body_over_the_bound_is_413(post):
    payload = base64.b64encode(b"\0" * (21 * 1024 * 1024)).decode()
    body = {"task": "describe", "images": [f"data:image/png;base64,{payload}"]}
    assert_error(post(body), 413, "payload_too_large")


def test_inline_image_over_its_bound_is_refused(post):
    payload = base64.b64encode(b"\0" * (11 * 1024 * 1024)).decode()
    assert_error(post({"task": "describe", "images": [f"data:image/png;base64,{payload}"]}), 422,
                 "image_too_large")


def test_unknown_job_is_404(api_url, auth):
    assert_error(requests.get(f"{api_url}/v1/jobs/0123456789abcdef", headers=auth, timeout=5), 404, "not_found")
    assert_error(requests.get(f"{api_url}/v1/jobs/nope?wait=1", headers=auth, timeout=5), 404, "not_found")


@pytest.mark.parametrize("wait", ["-1", "61", "soon", "nan", "inf"])
def test_wait_out_of_range_is_400(api_url, auth, wait):
    response = requests.get(f"{api_url}/v1/jobs/nope", params={"wait": wait}, headers=auth, timeout=5)
    assert_error(response, 400, "invalid_parameter")


def test_unknown_route_and_method_are_json_errors(api_url, auth):
    assert_error(requests.get(f"{api_url}/v2/things", timeout=5), 404, "not_found")
    assert_error(requests.delete(f"{api_url}/v1/jobs", headers=auth, timeout=5), 405, "method_not_allowed")
