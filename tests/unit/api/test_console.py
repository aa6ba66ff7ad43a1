"""The web console's views through Flask's test client, against a real Redis: sign-in and its cookie, CSRF and
Origin checks, the security headers, a key's isolation and the admin's view, the image route, the chart."""

from __future__ import annotations

import base64
import io
import re

import pytest

from api import create_app
from api.console.queues import chart_points
from shared.config import Settings
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from shared.store.queues import Queues
from tests.images import png

ORIGIN = "http://localhost"


@pytest.fixture(scope="module")
def app(redis_server, tmp_path_factory):
    settings = Settings(redis_url=redis_server.url, queue="visionq-console-unit", key_cache_s=0,
                        data_dir=tmp_path_factory.mktemp("console-data"))
    return create_app(settings)


@pytest.fixture(scope="module")
def keys(app, redis_server) -> KeyStore:
    return KeyStore(connect(Settings(redis_url=redis_server.url)))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def signed_in(app, secret: str):
    """A test client with a console session for this key."""
    client = app.test_client()
    token = csrf_of(client.get("/console/sign-in").get_data(as_text=True))
    answer = client.post("/console/sign-in", data={"key": secret, "csrf_token": token}, headers={"Origin": ORIGIN})
    assert answer.status_code == 303, answer.get_data(as_text=True)
    return client


def submit_json(app, secret: str) -> str:
    data_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    answer = app.test_client().post("/v1/jobs", json={"task": "describe", "images": [data_uri]},
                                    headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()["id"]


def test_root_redirects_to_the_console_and_it_to_sign_in(app):
    client = app.test_client()
    assert client.get("/").headers["Location"] == "/console/"
    assert client.get("/console/jobs").headers["Location"].endswith("/console/sign-in")
    assert client.get("/console/live.json").status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_that_is_not_the_key(app, keys):
    secret, _ = keys.create("console-unit")
    client = app.test_client()
    token = csrf_of(client.get("/console/sign-in").get_data(as_text=True))
    answer = client.post("/console/sign-in", data={"key": secret, "csrf_token": token}, headers={"Origin": ORIGIN})
    cookie = next(c for c in answer.headers.getlist("Set-Cookie") if c.startswith("visionq_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get Secure
    assert secret not in cookie
    assert client.get("/console/jobs").status_code == 200


def test_a_wrong_key_is_refused_and_gets_no_session(app):
    client = app.test_client()
    token = csrf_of(client.get("/console/sign-in").get_data(as_text=True))
    answer = client.post("/console/sign-in", data={"key": "vq_nope", "csrf_token": token}, headers={"Origin": ORIGIN})
    assert answer.status_code == 401
    assert "unknown or revoked" in answer.get_data(as_text=True)
    assert client.get("/console/jobs").status_code == 303


def test_posts_without_the_token_or_from_another_origin_are_refused(app, keys):
    secret, _ = keys.create("console-unit")
    client = signed_in(app, secret)
    job_id = submit_json(app, secret)
    token = csrf_of(client.get(f"/console/jobs/{job_id}").get_data(as_text=True))
    no_token = client.post(f"/console/jobs/{job_id}/cancel", headers={"Origin": ORIGIN})
    assert no_token.status_code == 403 and "csrf_rejected" in no_token.get_data(as_text=True)
    elsewhere = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": token},
                            headers={"Origin": "https://evil.example"})
    assert elsewhere.status_code == 403
    assert client.get(f"/console/jobs/{job_id}").get_data(as_text=True).count("Cancel the job") == 1  # still queued
    done = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": token}, headers={"Origin": ORIGIN})
    assert done.status_code == 303
    assert ">canceled<" in client.get(done.headers["Location"]).get_data(as_text=True)


def test_sign_in_itself_needs_its_doubled_token(app, keys):
    secret, _ = keys.create("console-unit")
    answer = app.test_client().post("/console/sign-in", data={"key": secret}, headers={"Origin": ORIGIN})
    assert answer.status_code == 403


def test_sign_out_ends_the_session_and_a_revoked_key_ends_it_too(app, keys):
    secret, key = keys.create("console-unit")
    client = signed_in(app, secret)
    token = csrf_of(client.get("/console/jobs").get_data(as_text=True))
    assert client.post("/console/sign-out", data={"csrf_token": token}, headers={"Origin": ORIGIN}).status_code == 303
    assert client.get("/console/jobs").status_code == 303
    client = signed_in(app, secret)
    keys.revoke(key.id)
    assert client.get("/console/jobs").status_code == 303


def test_pages_carry_a_strict_csp_and_the_cookie_does_not_open_the_json_api(app, keys):
    secret, _ = keys.create("console-unit")
    client = signed_in(app, secret)
    answer = client.get("/console/jobs")
    assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/v1/jobs").status_code == 401


def test_a_key_sees_only_its_own_jobs_and_an_admin_sees_every_key(app, keys):
    first, first_key = keys.create("console-first")
    second, _ = keys.create("console-second")
    admin, _ = keys.create("console-admin", admin=True)
    job_id = submit_json(app, first)
    assert job_id in signed_in(app, first).get("/console/jobs").get_data(as_text=True)
    other = signed_in(app, second)
    assert job_id not in other.get("/console/jobs").get_data(as_text=True)
    assert other.get(f"/console/jobs/{job_id}").status_code == 404
    assert other.get(f"/console/jobs?owner={first_key.id}").get_data(as_text=True).count(job_id) == 0
    assert other.get("/console/keys").status_code == 404
    boss = signed_in(app, admin)
    assert first_key.id in boss.get("/console/keys").get_data(as_text=True)
    assert job_id in boss.get(f"/console/jobs?owner={first_key.id}").get_data(as_text=True)
    assert boss.get(f"/console/jobs/{job_id}").status_code == 200


def test_an_inline_image_is_served_as_its_type_sandboxed(app, keys):
    secret, _ = keys.create("console-unit")
    job_id = submit_json(app, secret)
    client = signed_in(app, secret)
    answer = client.get(f"/console/jobs/{job_id}/images/0")
    assert answer.status_code == 200 and answer.mimetype == "image/png" and answer.data == png()
    assert answer.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert client.get(f"/console/jobs/{job_id}/images/1").status_code == 404


def test_model_output_is_escaped_on_the_job_page(app, keys, redis_server):
    secret, _ = keys.create("console-unit")
    job_id = submit_json(app, secret)
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    finish(redis_server, job_id, evil)
    html = signed_in(app, secret).get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_submit_form_reports_the_api_s_own_refusal(app, keys):
    secret, _ = keys.create("console-unit")
    client = signed_in(app, secret)
    token = csrf_of(client.get("/console/submit").get_data(as_text=True))
    answer = client.post("/console/submit", headers={"Origin": ORIGIN}, content_type="multipart/form-data",
                         data={"csrf_token": token, "task": "describe", "question": "", "max_new_tokens": "9999",
                               "images_files": (io.BytesIO(png()), "a.png")})
    assert answer.status_code == 422
    error = re.search(r'<div class="error" role="alert" id="submit-error">(.*?)</div>', answer.get_data(as_text=True),
                      re.DOTALL).group(1)
    assert "max_new_tokens" in error
    assert 'value="9999"' in answer.get_data(as_text=True)  # the form keeps what was typed


def finish(redis_server, job_id: str, text: str = "done") -> None:
    """End a queued job as a worker would: running, then succeeded with this text."""
    from shared.jobs import JobResult, Timings, TokenCounts
    from shared.store.jobs import JobStore

    store = JobStore(connect(Settings(redis_url=redis_server.url)), 3600)
    store.mark_running(job_id, "w@test")
    store.mark_succeeded(job_id, JobResult(text=text, model="m", tokens=TokenCounts(prompt=1, completion=2),
                                           timings=Timings(queue_ms=1, images_ms=2, inference_ms=3)))


def test_history_counts_the_jobs_that_end_each_minute(app, keys, redis_server):
    from api.context import services
    from shared.routing import queue_for

    secret, _ = keys.create("console-unit")
    with app.app_context():
        svc = services()
        queue = queue_for(svc.settings, svc.settings.served_models[0])
        before = svc.queues.history([queue], minutes=5)
        finish(redis_server, submit_json(app, secret))
        after = svc.queues.history([queue], minutes=5)
    assert len(after) == 5 and sum(after) == sum(before) + 1
    assert Queues(connect(Settings(redis_url=redis_server.url)), 4).history([], minutes=3) == [0, 0, 0]


def test_the_chart_scales_the_series_to_its_box():
    assert chart_points([0, 1, 2], width=100, height=10) == "0.0,10.0 50.0,5.0 100.0,0.0"
    assert chart_points([0, 0], width=100, height=10) == "0.0,10.0 100.0,10.0"


def test_the_job_list_pages_and_filters(app, keys):
    secret, _ = keys.create("console-unit")
    made = [submit_json(app, secret) for _ in range(3)]
    client = signed_in(app, secret)
    first = client.get("/console/jobs?limit=2").get_data(as_text=True)
    older = re.search(r'<a rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    second = client.get(older).get_data(as_text=True)
    assert [job_id in first for job_id in made] == [False, True, True]  # newest first
    assert made[0] in second and 'rel="next"' not in second
    assert made[0] not in client.get("/console/jobs?status=succeeded").get_data(as_text=True)
    assert client.get(f"/console/jobs?q={made[0]}").headers["Location"].endswith(f"/console/jobs/{made[0]}")
    assert "No job of yours" in client.get("/console/jobs?q=nosuchjob").get_data(as_text=True)


def test_a_web_image_is_a_link_the_console_never_fetches(app, keys):
    secret, _ = keys.create("console-unit")
    url = "https://93.184.216.34/photo.png"  # a public address: accepted at submit, never fetched by the API
    answer = app.test_client().post("/v1/jobs", json={"task": "describe", "images": [url]},
                                    headers={"Authorization": f"Bearer {secret}"})
    job_id = answer.get_json()["id"]
    client = signed_in(app, secret)
    html = client.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert f'<a href="{url}" rel="noopener noreferrer nofollow">' in html and "<img" not in html
    assert client.get(f"/console/jobs/{job_id}/images/0").status_code == 422  # no route fetches it either


def test_a_form_over_the_body_limit_gets_a_page_not_json(redis_server, tmp_path_factory, keys):
    small = create_app(Settings(redis_url=redis_server.url, queue="visionq-console-unit", key_cache_s=0,
                                max_body_bytes=64 * 1024, data_dir=tmp_path_factory.mktemp("console-small")))
    secret, _ = keys.create("console-too-large")
    client = signed_in(small, secret)
    form = csrf_of(client.get("/console/submit").get_data(as_text=True))
    answer = client.post("/console/submit", headers={"Origin": ORIGIN}, content_type="multipart/form-data",
                         data={"csrf_token": form, "task": "describe",
                               "images": (io.BytesIO(b"\0" * 200 * 1024), "big.png")})
    html = answer.get_data(as_text=True)
    assert answer.status_code == 413 and answer.mimetype == "text/html"
    assert "payload_too_large" in html and "Back to the jobs" in html
