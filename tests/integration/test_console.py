"""The web console in a real browser: headless Chromium (the system's, Debian's chromium package) driven by
Playwright, against the live stack: an API with the delivery worker (this module's), the session's GPU worker on
the tiny model and real webhook receivers. Screenshots go to tests/artifacts/console/."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from cli.client import Client
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from tests.conftest import PARKED_MODEL, settings_env
from tests.http_server import Route
from tests.images import png
from tests.paths import REPO
from tests.webhook_receiver import ScriptedReceiver

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                     "-e '.[test]')")
expect = playwright_api.expect

ARTIFACTS = REPO / "tests" / "artifacts" / "console"
# Webhooks to loopback receivers (the webhook allowances only), retried fast.
HOOK_ENV = {"VISIONQ_WEBHOOK_ALLOW_HTTP": "true", "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "VISIONQ_WEBHOOK_TIMEOUT_S": "1", "VISIONQ_WEBHOOK_RETRY_BASE_S": "0.2",
            "VISIONQ_WEBHOOK_RETRY_MAX_S": "0.3", "VISIONQ_WEBHOOK_POLL_S": "0.1"}
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    """The system's Chromium, or the one VISIONQ_CHROMIUM names: ./run test installs Debian's package as root."""
    if os.environ.get("VISIONQ_CHROMIUM"):
        return shutil.which(os.environ["VISIONQ_CHROMIUM"])
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (each test opens contexts of its own: their own cookies)."""
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium found ({os.environ.get('VISIONQ_CHROMIUM') or 'chromium'} is not on PATH; "
                    "apt-get install chromium, or set VISIONQ_CHROMIUM): the console's browser tests need one")
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def console_stack(stack, settings, tmp_path_factory):
    """An API and the delivery worker on the session stack's queue (its GPU worker runs the jobs)."""
    env = {**settings_env(settings), **HOOK_ENV}
    with Stack(settings, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("console-logs"),
               worker=False, batches=False) as running:
        yield running


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {ARTIFACTS}")
    return ARTIFACTS


def signed_in_page(browser, console_stack, secret: str, **context_options):
    """A fresh browser context (its own cookies) signed in to the console with this key."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{console_stack.api_url}/")
    expect(page).to_have_url(re.compile(r"/console/sign-in$"))
    page.get_by_label("API key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/jobs$"))
    return page


@pytest.fixture
def user(browser, console_stack, settings):
    """(secret, JSON API client, signed-in page) of a fresh key."""
    secret, _ = KeyStore(connect(settings)).create("console")
    page = signed_in_page(browser, console_stack, secret)
    yield secret, Client(console_stack.api_url, key=secret, timeout_s=30), page
    page.context.close()


def job_id_of(page) -> str:
    return re.search(r"/console/jobs/([0-9a-f]+)", page.url).group(1)


def test_submit_through_the_form_watch_it_end_and_see_the_api_s_result(user, artifacts):
    _, client, page = user
    page.get_by_role("link", name="Submit").click()
    page.get_by_label("Task", exact=True).select_option("describe")
    page.get_by_label("Max new tokens").fill("8")
    page.get_by_label("Images").set_input_files(files=[{"name": "red.png", "mimeType": "image/png",
                                                        "buffer": png(32, 24)}])
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("status")).to_have_text("The job was accepted.")
    job_id = job_id_of(page)
    expect(page.locator("#job-status")).to_have_text("succeeded")  # the page reloads itself until the job ends
    job = client.get(job_id)
    assert page.locator("#result-text").text_content() == job["result"]["text"]
    assert page.locator("#attempts").text_content() == "1"
    for timing in ("queue", "images", "inference"):
        assert page.locator(f"#timing-{timing}").text_content().endswith(" ms")
    image = page.get_by_role("img", name=re.compile("image 1 of the job"))
    assert image.evaluate("img => img.complete && img.naturalWidth") == 32  # served by the console, CSP and all
    page.screenshot(path=artifacts / "job-succeeded.png", full_page=True)
    page.get_by_role("link", name="Jobs").click()
    expect(page.get_by_role("link", name=job_id)).to_be_visible()
    page.get_by_label("Status", exact=True).select_option("failed")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("link", name=job_id)).to_have_count(0)


def test_a_waiting_job_shows_its_place_and_the_cancel_button_cancels_it(user, artifacts):
    _, client, page = user
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)  # served by no worker: it waits
    page.get_by_label("Job id").fill(job["id"])
    page.get_by_label("Job id").press("Enter")
    expect(page.locator("#queue-reason")).to_have_text("no_worker")
    assert page.locator("#queue-position").text_content().isdigit()
    page.screenshot(path=artifacts / "job-waiting.png", full_page=True)
    page.get_by_role("button", name="Cancel the job").click()
    expect(page.locator("#job-status")).to_have_text("canceled")
    assert client.get(job["id"])["status"] == "canceled"


def test_a_delivery_is_sent_again_from_its_button(user, artifacts):
    _, client, page = user
    with ScriptedReceiver() as receiver:
        job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL, webhook={"url": receiver.url})
        client.cancel(job["id"])
        receiver.wait_for(1)
        deadline = time.monotonic() + 30
        while client.deliveries(job["id"])[0]["status"] != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        page.goto(f"{page.url.split('/console/')[0]}/console/jobs/{job['id']}")
        expect(page.locator(".delivery-status")).to_have_text("delivered")
        page.get_by_role("button", name=re.compile("Send again")).click()
        expect(page.get_by_role("status")).to_have_text("The delivery will be sent again now.")
        first, again = receiver.wait_for(2)
        assert first.webhook_id == again.webhook_id
    deadline = time.monotonic() + 30
    while len(client.deliveries(job["id"])[0]["attempts"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.reload()
    expect(page.locator(".attempts li")).to_have_count(2)
    page.screenshot(path=artifacts / "job-deliveries.png", full_page=True)


def test_another_key_cannot_see_the_job_and_a_tokenless_post_is_refused(user, browser, console_stack, settings):
    _, client, page = user
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)
    job_url = f"{console_stack.api_url}/console/jobs/{job['id']}"
    other_secret, _ = KeyStore(connect(settings)).create("console-other")
    other = signed_in_page(browser, console_stack, other_secret)
    try:
        assert other.goto(job_url).status == 404
        expect(other.get_by_role("alert")).to_contain_text("not_found")
        other.goto(f"{console_stack.api_url}/console/jobs")
        expect(other.get_by_role("link", name=job["id"])).to_have_count(0)
    finally:
        other.context.close()
    # The browser's own session, a POST without the form's token: refused, the job still waits.
    refused = page.request.post(f"{job_url}/cancel", form={"reason": "forged"},
                                headers={"Origin": console_stack.api_url})
    assert refused.status == 403 and "csrf_rejected" in refused.text()
    assert client.get(job["id"])["status"] == "queued"
    client.cancel(job["id"])


def test_a_form_on_another_site_cannot_act_for_the_signed_in_browser(user, console_stack, http_server):
    _, client, page = user
    job = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)
    target = f"{console_stack.api_url}/console/jobs/{job['id']}/cancel"
    forged = (f'<form id="f" method="post" action="{target}"><input name="csrf_token" value="guessed"></form>'
              '<script>document.getElementById("f").submit()</script>').encode()
    evil = http_server.add("/forged-cancel", Route(forged, "text/html"))  # 127.0.0.5: another site than 127.0.0.1
    page.goto(evil)
    expect(page).to_have_url(re.compile(r"/console/sign-in$"))  # the SameSite cookie stayed home: no session
    assert client.get(job["id"])["status"] == "queued"
    client.cancel(job["id"])


def test_a_batch_page_shows_its_progress_gives_its_files_and_retries_its_failures(user, artifacts):
    _, client, page = user
    lines = [{"custom_id": "good-1", "images": ["bar_chart.png"]}, {"custom_id": "good-2", "images": ["bar_chart.png"]},
             {"custom_id": "broken", "images": ["not_an_image.png"]}, {"custom_id": "refused", "images": []}]
    batch = client.wait_batch(client.create_batch(requests=lines, task="describe", max_new_tokens=2)["id"],
                              timeout_s=120, poll_s=0.1)
    assert batch["status"] == "completed" and batch["counts"]["failed"] == 1
    page.get_by_role("link", name="Batches").click()
    page.get_by_role("link", name=batch["id"]).click()
    assert page.get_by_label("Ended").get_attribute("value") == "3"
    assert page.get_by_label("Ended").get_attribute("max") == "3"
    assert page.get_by_label("Failed").get_attribute("value") == "1"
    page.screenshot(path=artifacts / "batch.png", full_page=True)
    with page.expect_download() as results:
        page.get_by_role("link", name="Results (JSONL)").click()
    got = [json.loads(line) for line in Path(results.value.path()).read_text().splitlines()]
    assert sorted(line["custom_id"] for line in got) == ["broken", "good-1", "good-2"]
    page.get_by_role("button", name="Retry the 1 failed items").click()
    expect(page.get_by_role("status")).to_have_text("Its failed items run again.")
    assert client.wait_batch(batch["id"], timeout_s=120, poll_s=0.1)["attempt"] == 2


def test_the_queues_page_updates_itself_and_charts_the_jobs_that_ended(user, artifacts):
    _, client, page = user
    client.wait(client.submit("describe", ["bar_chart.png"], max_new_tokens=4)["id"], timeout_s=60)
    page.get_by_role("link", name="Queues & workers").click()
    expect(page.locator("#live-state")).to_have_text(re.compile("^Updated"))
    worker = page.locator("#workers tbody tr").filter(has_text="cpu").first
    expect(worker.locator('[data-field="jobs_rate"]')).to_have_text(re.compile(r"^\d+\.\d\d$"))  # two polls
    assert float(page.locator("#chart-peak").text_content()) > 0
    assert len(page.locator("#chart-line").get_attribute("points").split()) == 60
    page.screenshot(path=artifacts / "queues.png", full_page=True)


def test_the_console_reads_at_phone_width(browser, console_stack, settings, artifacts):
    secret, _ = KeyStore(connect(settings)).create("console-phone")
    client = Client(console_stack.api_url, key=secret, timeout_s=30)
    job = client.wait(client.submit("describe", ["bar_chart.png"], max_new_tokens=4)["id"], timeout_s=60)
    page = signed_in_page(browser, console_stack, secret, viewport={"width": 390, "height": 844})
    try:
        for path, name in ((f"/console/jobs/{job['id']}", "phone-job.png"), ("/console/jobs", "phone-jobs.png"),
                           ("/console/submit", "phone-submit.png")):
            page.goto(f"{console_stack.api_url}{path}")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, path  # no sideways scrolling
            page.screenshot(path=artifacts / name, full_page=True)
        page.keyboard.press("Tab")  # the first stop is the skip link, visible once focused
        expect(page.get_by_role("link", name="Skip to the content")).to_be_focused()
    finally:
        page.context.close()
