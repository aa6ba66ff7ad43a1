"""Batches end to end, through the API, the batch worker and the GPU worker of the session stack (real Redis, moto
as S3, the tiny model): a few hundred items, bad lines, cancel mid-way, retry of failed items, an S3 manifest and
an S3 prefix, the key's cap, isolation and idempotency, the signed end event, and `visionq batch`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import boto3
import pytest
from standardwebhooks import Webhook

from cli.client import ApiError, Client, batch_ended
from cli.embedded_redis import free_port
from cli.stack import Stack
from shared.outbound.s3 import parse_s3_uri
from tests.conftest import PARKED_MODEL, settings_env
from tests.images import encode, random_image
from tests.webhook_receiver import ScriptedReceiver

BUCKET = "batch-inputs"
HOOK_ENV = {"VISIONQ_ALLOW_HTTP": "false", "VISIONQ_URL_ALLOWED_NETWORKS": "[]",  # the README's recipe
            "VISIONQ_WEBHOOK_ALLOW_HTTP": "true", "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "VISIONQ_WEBHOOK_TIMEOUT_S": "2", "VISIONQ_WEBHOOK_RETRY_BASE_S": "0.2",
            "VISIONQ_WEBHOOK_RETRY_MAX_S": "0.5", "VISIONQ_WEBHOOK_POLL_S": "0.1"}


@pytest.fixture(scope="module")
def s3(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    return client


def error_of(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def wait_for(client: Client, batch_id: str, timeout_s: float = 180) -> dict:
    batch = client.wait_batch(batch_id, timeout_s=timeout_s, poll_s=0.1)
    assert batch_ended(batch), batch
    return batch


def wait_until(check, timeout_s: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.05)
    return value


def png(seed: int) -> bytes:
    return encode(random_image(32, 24, seed=seed), "PNG")


def items(count: int, **fields) -> list[dict]:
    return [{"custom_id": f"item-{i:03d}", "images": ["bar_chart.png"], **fields} for i in range(count)]


# --- the whole path --------------------------------------------------------------------------------------


def test_a_few_hundred_items_from_a_jsonl_upload_end_to_end(make_client, settings, s3):
    client = make_client()
    lines = [{"custom_id": f"item-{i:03d}", "task": "ocr" if i % 3 else "describe",
              "images": ["book_cover.png" if i % 2 else "bar_chart.png"]} for i in range(240)]
    lines[7] = {"custom_id": "item-007", "method": "POST", "url": "/v1/jobs",
                "body": {"task": "ocr", "images": ["book_cover.png"]}}  # OpenAI's form
    upload = client.upload_jsonl("".join(json.dumps(line) + "\n" for line in lines).encode())
    created = client.create_batch(input_file=upload["ref"], max_new_tokens=2)
    assert created["status"] == "validating" and created["priority"] == "low"
    batch = wait_for(client, created["id"])
    counts = batch["counts"]
    assert batch["status"] == "completed" and batch["input_done"]
    assert (counts["items"], counts["succeeded"], counts["refused"], counts["lines"]) == (240, 240, 0, 240)
    assert counts["queued"] == counts["running"] == counts["failed"] == counts["canceled"] == 0
    assert batch["started_at"] <= batch["finished_at"]
    results = list(client.batch_results(created["id"]))
    assert [line["custom_id"] for line in results] == [line["custom_id"] for line in lines]
    assert all(line["status"] == "succeeded" and "text" in line["result"] for line in results)
    job = client.get(results[7]["id"])
    assert (job["batch_id"], job["custom_id"], job["task"], job["priority"]) == (created["id"], "item-007", "ocr",
                                                                                  "low")
    # The results are in S3 too, as written by the finish step before it told the end.
    location = parse_s3_uri(batch["output_file"])
    archived = s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode().splitlines()
    assert [json.loads(line) for line in archived] == results


def test_bad_lines_are_reported_and_do_not_stop_the_rest(make_client):
    client = make_client()
    requests = [*items(3), {"custom_id": "item-001", "images": ["book_cover.png"]}, {"images": ["a.png"]},
                {"custom_id": "paint", "task": "paint", "images": ["a.png"]}, 42,
                {"custom_id": "not-png", "images": ["not_an_image.png"]}]
    batch = wait_for(client, client.create_batch(requests=requests, task="describe", max_new_tokens=2)["id"])
    assert batch["status"] == "completed"
    counts = batch["counts"]
    assert (counts["items"], counts["refused"], counts["succeeded"], counts["failed"]) == (4, 4, 3, 1)
    errors = list(client.batch_errors(batch["id"]))
    assert [(e["line"], e["error"]["code"]) for e in errors] == [
        (4, "duplicate_custom_id"), (5, "invalid_line"), (6, "unknown_task"), (7, "invalid_line")]
    assert errors[0]["custom_id"] == "item-001"
    failed = [line for line in client.batch_results(batch["id"]) if line["status"] == "failed"]
    assert [(line["custom_id"], line["error"]["code"]) for line in failed] == [("not-png", "image_unsupported_format")]


def test_num_crops_of_a_batch_for_a_model_without_it_refuses_each_line(make_client, settings):
    client = make_client()
    refused = error_of(lambda: client.create_batch(requests=items(1), task="describe", num_crops=4,
                                                   model=settings.model))
    assert (refused.status, refused.code) == (422, "num_crops_unsupported")  # the batch names the model: at once
    batch = wait_for(client, client.create_batch(requests=[*items(1), {"custom_id": "own", "images": ["a.png"],
                                                                       "num_crops": 4}], task="describe")["id"])
    # Without a model of its own, each line is checked against its model (here the default, the tiny LLaVA).
    assert batch["counts"]["refused"] == 1 and batch["counts"]["items"] == 1
    assert [e["error"]["code"] for e in client.batch_errors(batch["id"])] == ["num_crops_unsupported"]


def test_a_strict_batch_with_a_bad_line_is_refused_at_once(make_client):
    client = make_client()
    refused = error_of(lambda: client.create_batch(requests=[*items(2), {"custom_id": "x", "images": []}],
                                                   task="describe", strict=True))
    assert (refused.status, refused.code) == (422, "invalid_lines")
    assert client.batches()["batches"] == []


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 422, "invalid_input"),
    ({"requests": [], "images": "s3://batch-inputs/x/"}, 422, "invalid_input"),
    ({"input_file": "ftp://host/x.jsonl"}, 422, "invalid_input"),
    ({"input_file": "upload://AAAAAAAAAAAAAAAAAAAAAAAA"}, 422, "input_not_found"),
    ({"input_file": "s3://not-granted/x.jsonl"}, 422, "input_bucket_not_allowed"),
    ({"images": "s3://batch-inputs/photos/"}, 422, "invalid_request"),  # no task
    ({"requests": items(1), "task": "paint"}, 422, "unknown_task"),
    ({"requests": items(1), "max_new_tokens": 0}, 422, "max_new_tokens_out_of_range"),
    ({"requests": items(1), "num_crops": 17}, 422, "invalid_num_crops"),
    ({"requests": items(1), "priority": "urgent"}, 422, "invalid_request"),
    ({"requests": items(1001)}, 422, "too_many_items"),
    ({"requests": items(1), "webhook": {"url": "http://127.0.0.5/x", "events": ["job.exploded"]}}, 422,
     "invalid_webhook_events"),
])
def test_a_bad_batch_request_is_refused_with_a_stable_code(make_client, body, status, code):
    refused = error_of(lambda: make_client(s3_buckets=[BUCKET]).create_batch(**body))
    assert (refused.status, refused.code) == (status, code)


# --- cancel and retry -------------------------------------------------------------------------------------


def test_cancel_mid_way_cancels_the_queued_items_and_stops_the_running_ones(make_client):
    client = make_client()
    requests = [{"custom_id": f"long-{i}", "images": ["bar_chart.png"], "question": f"Describe part {i}."}
                for i in range(40)]
    batch = client.create_batch(requests=requests, task="describe", max_new_tokens=1024)
    wait_until(lambda: client.batch(batch["id"])["counts"]["running"] > 0, what="an item running")
    canceled = client.cancel_batch(batch["id"])
    assert canceled["status"] == "canceled" and "canceled_at" in canceled
    ended = wait_for(client, batch["id"], timeout_s=60)
    counts = ended["counts"]
    assert ended["status"] == "canceled" and counts["queued"] == counts["running"] == 0
    assert counts["canceled"] > 0 and counts["succeeded"] + counts["failed"] + counts["canceled"] == counts["items"]
    stopped = [client.get(line["id"]) for line in client.batch_results(batch["id"]) if line["status"] == "canceled"]
    assert any("started_at" in job for job in stopped)  # a running item stopped, not only queued ones
    assert all(job["error"]["code"] == "canceled" for job in stopped)
    again = error_of(lambda: client.cancel_batch(batch["id"]))
    assert (again.status, again.code) == (409, "already_finished")
    assert error_of(lambda: client.retry_batch(batch["id"])).code == "not_retryable"


def test_retry_runs_the_failed_items_again_with_the_same_custom_ids(make_client, s3):
    client = make_client(s3_buckets=[BUCKET])
    present, absent = [f"retry/present-{i}.png" for i in range(4)], [f"retry/late-{i}.png" for i in range(3)]
    for i, key in enumerate(present):
        s3.put_object(Bucket=BUCKET, Key=key, Body=png(i))
    requests = [{"custom_id": key, "images": [f"s3://{BUCKET}/{key}"]} for key in present + absent]
    first = wait_for(client, client.create_batch(requests=requests, task="describe", max_new_tokens=2)["id"])
    assert (first["status"], first["counts"]["succeeded"], first["counts"]["failed"]) == ("completed", 4, 3)
    before = {line["custom_id"]: line for line in client.batch_results(first["id"])}
    assert {cid for cid, line in before.items() if line["status"] == "failed"} == set(absent)
    for i, key in enumerate(absent):  # what was missing arrives
        s3.put_object(Bucket=BUCKET, Key=key, Body=png(10 + i))
    retried = client.retry_batch(first["id"])
    assert retried["status"] == "in_progress" and retried["attempt"] == 2 and "finished_at" not in retried
    second = wait_for(client, first["id"])
    assert (second["status"], second["counts"]["succeeded"], second["counts"]["failed"]) == ("completed", 7, 0)
    after = {line["custom_id"]: line for line in client.batch_results(first["id"])}
    assert {cid for cid in after if after[cid]["id"] != before[cid]["id"]} == set(absent)
    assert all(line["status"] == "succeeded" for line in after.values())
    assert error_of(lambda: client.retry_batch(first["id"])).code == "nothing_to_retry"


# --- S3 inputs --------------------------------------------------------------------------------------------


def test_every_image_under_an_s3_prefix_is_an_item(make_client, s3):
    client = make_client(s3_buckets=[BUCKET])
    keys = [f"prefix-form/shots/{i:02d}.png" for i in range(12)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=BUCKET, Key=key, Body=png(30 + i))
    s3.put_object(Bucket=BUCKET, Key="prefix-form/shots/README.txt", Body=b"not an image")
    batch = wait_for(client, client.create_batch(images=f"s3://{BUCKET}/prefix-form/shots/", task="ocr",
                                                 max_new_tokens=2)["id"])
    assert batch["status"] == "completed" and batch["input"] == {"kind": "s3_prefix",
                                                                 "uri": f"s3://{BUCKET}/prefix-form/shots/"}
    assert (batch["counts"]["items"], batch["counts"]["succeeded"], batch["counts"]["refused"]) == (12, 12, 1)
    assert sorted(line["custom_id"] for line in client.batch_results(batch["id"])) == keys
    [refused] = client.batch_errors(batch["id"])
    assert (refused["custom_id"], refused["error"]["code"]) == ("prefix-form/shots/README.txt", "not_an_image")


def test_an_s3_manifest_and_one_that_is_missing(make_client, s3):
    client = make_client(s3_buckets=[BUCKET])
    manifest = "".join(json.dumps(line) + "\n" for line in items(5, task="describe")).encode()
    s3.put_object(Bucket=BUCKET, Key="manifests/five.jsonl", Body=manifest)
    batch = wait_for(client, client.create_batch(input_file=f"s3://{BUCKET}/manifests/five.jsonl",
                                                 max_new_tokens=2)["id"])
    assert (batch["status"], batch["counts"]["succeeded"]) == ("completed", 5)
    missing = wait_for(client, client.create_batch(input_file=f"s3://{BUCKET}/manifests/none.jsonl")["id"])
    assert missing["status"] == "failed" and missing["error"]["code"] == "input_not_found"
    assert missing["counts"]["items"] == 0


# --- the key: cap, isolation, idempotency -----------------------------------------------------------------


def test_items_fill_only_their_share_of_the_key_s_cap(make_client):
    client = make_client(max_active_jobs=10)
    batch = client.create_batch(requests=items(30), task="describe", model=PARKED_MODEL)  # no worker: they wait
    wait_until(lambda: client.batch(batch["id"])["counts"]["items"] == 9, what="9 items admitted")
    time.sleep(0.5)  # the batch worker polls again meanwhile: still 9 (we wait for nothing to happen)
    assert client.batch(batch["id"])["counts"]["items"] == 9
    single = client.submit("describe", ["bar_chart.png"], model=PARKED_MODEL)  # the key's own job has room
    assert single["status"] == "queued"
    client.cancel_batch(batch["id"])
    ended = wait_for(client, batch["id"], timeout_s=30)
    assert (ended["counts"]["items"], ended["counts"]["canceled"]) == (9, 9)
    client.cancel(single["id"])


def test_another_key_sees_no_batch_of_this_one(make_client):
    owner, other = make_client(), make_client()
    batch = owner.create_batch(requests=items(2), task="describe", max_new_tokens=2)
    for call in (other.batch, other.cancel_batch, other.retry_batch, other.batch_deliveries,
                 lambda b: list(other.batch_results(b)), lambda b: list(other.batch_errors(b))):
        refused = error_of(lambda call=call: call(batch["id"]))
        assert (refused.status, refused.code) == (404, "not_found")
    assert other.batches()["batches"] == []
    assert [b["id"] for b in owner.batches()["batches"]] == [batch["id"]]
    wait_for(owner, batch["id"])
    assert [b["id"] for b in owner.batches(status="completed")["batches"]] == [batch["id"]]


def test_the_same_idempotency_key_and_body_is_the_same_batch(make_client):
    client = make_client()
    first = client.create_batch(requests=items(2), task="describe", max_new_tokens=2, idempotency_key="b-1")
    again = client.http.post(f"{client.base_url}/v1/batches", json={"requests": items(2), "task": "describe",
                                                                    "max_new_tokens": 2},
                             headers={"Idempotency-Key": "b-1"}, timeout=10)
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = error_of(lambda: client.create_batch(requests=items(3), task="describe", idempotency_key="b-1"))
    assert other.code == "idempotency_conflict"
    assert len(client.batches()["batches"]) == 1


# --- the end event ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook_api(stack, settings, tmp_path_factory):
    """An API and a webhook delivery worker that let webhooks reach 127.0.0.1, on the session stack's queues (its
    GPU worker runs the items, its batch worker admits them)."""
    env = {**settings_env(settings), **HOOK_ENV}
    with Stack(settings, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("batch-hook-logs"),
               worker=False, batches=False) as hooked:
        yield hooked


def test_the_end_is_one_signed_event_and_items_send_theirs_only_when_asked(hook_api, settings):
    from shared.store.api_keys import KeyStore
    from shared.store.connection import connect

    secret, _ = KeyStore(connect(settings)).create("batch-hooks")
    client = Client(hook_api.api_url, key=secret, timeout_s=30)
    with ScriptedReceiver() as quiet, ScriptedReceiver() as chatty:
        plain = client.create_batch(requests=items(3), task="describe", max_new_tokens=2,
                                    webhook={"url": quiet.url})
        asked = client.create_batch(requests=items(2), task="describe", max_new_tokens=2,
                                    webhook={"url": chatty.url, "events": ["batch.completed", "job.succeeded"]})
        (request,) = quiet.wait_for(1)
        chatty.wait_for(3)
        done = client.batch(plain["id"])
        event = Webhook(client.webhook_secret()).verify(request.body, request.headers)
        assert event == {"type": "batch.completed", "timestamp": done["finished_at"], "data": done}
        assert request.webhook_id == f"msg_{plain['id']}"
        types = sorted(json.loads(r.body)["type"] for r in chatty.received)
        assert types == ["batch.completed", "job.succeeded", "job.succeeded"]
        deliveries = wait_until(lambda: [d for d in client.batch_deliveries(asked["id"])
                                         if d["status"] == "delivered"], what="the delivery recorded")
        assert deliveries[0]["type"] == "batch.completed"
        time.sleep(0.3)  # nothing else comes (we wait for nothing to happen)
        assert len(quiet.received) == 1 and len(chatty.received) == 3


# --- the command line -------------------------------------------------------------------------------------


def visionq(*args: str, client: Client, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli.main", *args, "--url", client.base_url,
               "--key", client.http.headers["Authorization"].split()[1]]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=cwd)


def test_visionq_batch_of_a_folder_writes_its_results_and_resumes_the_same_batch(make_client, image_root, tmp_path):
    client = make_client()
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name in ("bar_chart.png", "book_cover.png", "street_day.png"):
        shutil.copy(image_root / name, folder / name)
    shutil.copy(image_root / "street_night.png", folder / "more" / "night.png")
    (folder / "notes.txt").write_text("not an image: not part of the batch")
    out = tmp_path / "results.jsonl"
    first = visionq("batch", str(folder), "--task", "ocr", "--max-new-tokens", "2", "--out", str(out), client=client,
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in results) == ["bar_chart.png", "book_cover.png", "more/night.png",
                                                              "street_day.png"]
    assert all(line["status"] == "succeeded" for line in results)
    batch_id = json.loads((tmp_path / "results.jsonl.batch.json").read_text())["batch_id"]
    assert f"batch {batch_id}" in first.stdout
    assert "4 images in" in first.stdout and "1 other files skipped" in first.stdout
    assert "4 succeeded, 0 failed, 0 canceled, 0 lines refused" in first.stdout
    again = visionq("batch", str(folder), "--task", "ocr", "--max-new-tokens", "2", "--out", str(out), client=client,
                    cwd=tmp_path)
    assert again.returncode == 0 and f"batch {batch_id}: completed" in again.stdout  # the same batch, not a new one
    assert [b["id"] for b in client.batches()["batches"]] == [batch_id]
    status = visionq("batch", "status", batch_id, client=client, cwd=tmp_path)
    assert json.loads(status.stdout)["counts"]["succeeded"] == 4
    printed = visionq("batch", "results", batch_id, client=client, cwd=tmp_path)
    assert sorted(json.loads(line)["custom_id"] for line in printed.stdout.splitlines()) == sorted(
        line["custom_id"] for line in results)


def test_visionq_batch_of_a_manifest_reports_its_refused_lines(make_client, tmp_path):
    client = make_client()
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in items(3, task="describe")) + "{oops\n")
    out = tmp_path / "out.jsonl"
    run = visionq("batch", str(manifest), "--max-new-tokens", "2", "--out", str(out), client=client, cwd=tmp_path)
    assert run.returncode == 1, run.stderr  # a line was refused
    assert len(out.read_text().splitlines()) == 3
    [refused] = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert (refused["line"], refused["error"]["code"]) == (4, "invalid_json")
    assert "1 lines refused" in run.stdout
