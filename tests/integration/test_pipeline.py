"""The whole path with real parts: HTTP API -> Redis -> solo Celery worker on the tiny model -> stored result."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import requests
import torch
from PIL import Image

from cli.client import file_to_data_uri
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.workers import WorkerRegistry


@pytest.fixture(scope="session")
def reference(tiny_model_path):
    """The tiny model loaded straight from transformers in the test process: the oracle for every result."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from worker.engine import resolve_device, resolve_dtype

    torch.set_num_threads(1)  # the worker runs with one thread too: same float sums, same argmax
    device = resolve_device("auto")  # where the worker runs: fp32 on the CPU, bf16 on a GPU
    dtype = resolve_dtype("auto", device)
    processor = AutoProcessor.from_pretrained(tiny_model_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=dtype).to(device).eval()
    return processor, model


def direct_generate(reference, image_paths, question, max_new_tokens) -> tuple[str, int, int]:
    """A plain greedy `generate` on the processor's inputs for the cookbook prompt; no visionq code involved."""
    processor, model = reference
    placeholders = "<image>\n" * len(image_paths)
    prompt = f"<|user|>\n{placeholders}{question}<|end|>\n<|assistant|>\n"
    images = [Image.open(path).convert("RGB") for path in image_paths]
    inputs = processor(text=prompt, images=images, return_tensors="pt").to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new_tokens, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new_tokens)


CASES = [
    ("describe", ["bar_chart.png"], None, "Describe this image in detail."),
    ("ocr", ["book_cover.png"], None, "Extract all the text in this image, in reading order."),
    ("compare", ["street_day.png", "street_night.png"], None, "What is the difference between these images?"),
    ("compare", ["street_day.png", "street_night.png", "bar_chart.png"], "Which one is a chart?",
     "Which one is a chart?"),
    ("describe", ["book_cover.png"], "What colour is the cover?", "What colour is the cover?"),
]


@pytest.mark.parametrize(("task", "images", "question", "expected_question"), CASES)
def test_result_equals_a_direct_greedy_generate(client, reference, image_root, task, images, question,
                                                expected_question):
    job = client.submit(task, images, question=question, max_new_tokens=24)
    finished = client.wait(job["id"], timeout_s=60)
    assert finished["status"] == "succeeded", finished
    text, prompt_tokens, completion_tokens = direct_generate(
        reference, [image_root / name for name in images], expected_question, 24)
    result = finished["result"]
    assert result["text"] == text
    assert result["tokens"] == {"prompt": prompt_tokens, "completion": completion_tokens}
    assert finished["question"] == expected_question
    assert set(result["timings"]) == {"queue_ms", "images_ms", "inference_ms"}
    assert all(value >= 0 for value in result["timings"].values())


def test_inline_data_uri_gives_the_same_result_as_the_file(client, image_root):
    by_path = client.wait(client.submit("ocr", ["book_cover.png"], max_new_tokens=16)["id"], 60)
    inline = client.wait(client.submit("ocr", [file_to_data_uri(image_root / "book_cover.png")],
                                       max_new_tokens=16)["id"], 60)
    assert by_path["status"] == inline["status"] == "succeeded"
    assert inline["result"]["text"] == by_path["result"]["text"]


def test_submit_answers_202_with_location_and_a_queued_job(api_url, auth):
    response = requests.post(f"{api_url}/v1/jobs", json={"task": "describe", "images": ["bar_chart.png"],
                                                         "max_new_tokens": 4}, headers=auth, timeout=10)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["image_count"] == 1 and "images" not in job
    assert job["max_new_tokens"] == 4 and "result" not in job


def test_job_moves_along_the_legal_path(client, settings):
    """Watch every status the job takes through Redis pub/sub and the hash: queued -> running -> succeeded."""
    store = JobStore(connect(settings), settings.result_ttl_s)
    job = client.submit("describe", ["bar_chart.png"], max_new_tokens=200)
    seen = [job["status"]]
    deadline = time.monotonic() + 60
    while seen[-1] != "succeeded" and time.monotonic() < deadline:
        status = store.get(job["id"]).status.value
        if status != seen[-1]:
            seen.append(status)
    assert seen in (["queued", "running", "succeeded"], ["queued", "succeeded"])
    finished = client.get(job["id"])
    created, started, ended = (datetime.fromisoformat(finished[k]) for k in ("created_at", "started_at",
                                                                              "finished_at"))
    assert created <= started <= ended
    assert finished["attempts"] == 1 and finished["worker"]


def test_wait_returns_as_soon_as_the_job_ends(client):
    job = client.submit("describe", ["street_day.png"], max_new_tokens=8)
    started = time.monotonic()
    finished = client.get(job["id"], wait_s=30)
    elapsed = time.monotonic() - started
    assert finished["status"] == "succeeded"
    assert elapsed < 10  # ended long before the 30 s wait ran out


def test_wait_runs_out_on_a_job_that_has_not_ended(client):
    long_job = client.submit("describe", ["street_day.png"], max_new_tokens=1024)
    started = time.monotonic()
    job = client.get(long_job["id"], wait_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert job["status"] in ("queued", "running")
    assert client.wait(long_job["id"], 120)["status"] == "succeeded"


def test_bad_image_fails_the_job_and_the_worker_carries_on(client):
    bad = client.submit("describe", ["not_an_image.png"])
    missing = client.submit("describe", ["no_such_file.png"])
    good = client.submit("describe", ["bar_chart.png"], max_new_tokens=4)
    assert client.wait(bad["id"], 60)["error"]["code"] == "image_unsupported_format"
    assert client.wait(missing["id"], 60)["error"]["code"] == "image_not_found"
    failed = client.get(bad["id"])
    assert failed["status"] == "failed" and "result" not in failed
    assert client.wait(good["id"], 60)["status"] == "succeeded"


def test_model_is_loaded_once_per_worker_process(client, stack, settings):
    store = JobStore(connect(settings), settings.result_ttl_s)
    before = WorkerRegistry(store.redis).info(stack.worker_name)
    jobs = [client.submit("describe", ["bar_chart.png"], max_new_tokens=2) for _ in range(12)]
    assert all(client.wait(job["id"], 60)["status"] == "succeeded" for job in jobs)
    deadline = time.monotonic() + 10  # a task thread counts its job just after storing the result
    while WorkerRegistry(store.redis).info(stack.worker_name)["jobs"] - before.get("jobs", 0) < 12:
        assert time.monotonic() < deadline, "the worker did not count its 12 jobs"
        time.sleep(0.05)
    after = WorkerRegistry(store.redis).info(stack.worker_name)
    assert after["loads"] == 1
    assert after["pid"] == before["pid"] == stack.processes["worker"].pid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the worker chose it, in bf16")
def test_worker_runs_on_the_gpu_in_bfloat16(stack, settings):
    info = WorkerRegistry(connect(settings)).info(stack.worker_name)
    assert info["device"].startswith("cuda") and info["dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_the_llava_model_refuses_num_crops(api_url, auth, image_root, kind):
    if kind == "json":
        response = requests.post(f"{api_url}/v1/jobs", headers=auth, timeout=10,
                                 json={"task": "describe", "images": ["bar_chart.png"], "num_crops": 4})
    else:
        response = requests.post(f"{api_url}/v1/jobs", headers=auth, timeout=10,
                                 data={"task": "describe", "num_crops": "4"},
                                 files=[("file", ("a.png", (image_root / "bar_chart.png").read_bytes(), "image/png"))])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "num_crops_unsupported" and "num_crops" in error["message"]
