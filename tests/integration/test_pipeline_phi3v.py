"""The whole path on the tiny native Phi-3-vision: the worker picks the port for model_type phi3_v and prompts it
the Phi-3 cookbook way; results equal a direct greedy `generate`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from cli.client import Client
from cli.embedded_redis import free_port
from cli.stack import Stack
from tests.conftest import settings_env


@pytest.fixture(scope="module")
def phi3v_path(tmp_path_factory):
    from cli.tiny_model import build_tiny_phi3v

    return build_tiny_phi3v(tmp_path_factory.mktemp("models") / "tiny-phi3v")


@pytest.fixture(scope="module")
def phi3v_stack(settings, phi3v_path, tmp_path_factory):
    phi3v = settings.model_copy(update={"queue": "visionq-phi3v", "model": str(phi3v_path)})
    # Its model's name is no Phi-3-vision checkpoint's: the setting says that it takes num_crops.
    # One preprocessing process (worker/preprocess.py; the CPU default is none): these jobs' images are decoded
    # and their prompts made there, so that the results below check the pool's path too.
    env = {**settings_env(phi3v), "VISIONQ_QUEUE": "visionq-phi3v",
           "VISIONQ_NUM_CROPS_MODELS": json.dumps([f"*/{phi3v_path.name}"]), "VISIONQ_PREPROCESS_PROCESSES": "1"}
    with Stack(phi3v, env=env, api_port=free_port(), log_dir=tmp_path_factory.mktemp("phi3v-logs"),
               webhooks=False, batches=False) as stack:
        yield stack


@pytest.fixture(scope="module")
def phi3v_reference(phi3v_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import worker.models.phi3v  # noqa: F401
    from worker.engine import resolve_device, resolve_dtype

    torch.set_num_threads(1)
    device = resolve_device("auto")
    model = AutoModelForImageTextToText.from_pretrained(phi3v_path, dtype=resolve_dtype("auto", device))
    return AutoProcessor.from_pretrained(phi3v_path), model.to(device).eval()


CASES = [
    ("describe", ["bar_chart.png"], "Describe this image in detail."),
    ("ocr", ["book_cover.png"], "Extract all the text in this image, in reading order."),
    ("compare", ["street_day.png", "street_night.png"], "What is the difference between these images?"),
]


@pytest.mark.parametrize(("task", "images", "question"), CASES)
def test_phi3v_result_equals_a_direct_greedy_generate(phi3v_stack, phi3v_reference, image_root, task, images,
                                                      question):
    client = Client(phi3v_stack.api_url, key=phi3v_stack.api_key, timeout_s=30)
    finished = client.wait(client.submit(task, images, max_new_tokens=12)["id"], 120)
    assert finished["status"] == "succeeded", finished
    processor, model = phi3v_reference
    placeholders = "".join(f"<|image_{i}|>\n" for i in range(1, len(images) + 1))
    prompt = f"<|user|>\n{placeholders}{question}<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [Image.open(image_root / n).convert("RGB") for n in images], return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert finished["result"]["text"] == processor.decode(new_tokens, skip_special_tokens=True)
    assert finished["result"]["tokens"]["prompt"] == inputs["input_ids"].shape[1]


def reference_tokens(phi3v_path, model, images: list[Image.Image], num_crops: int, max_new_tokens: int):
    """The prompt length and text of a direct greedy `generate`, the processor loaded at `num_crops`."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(phi3v_path, num_crops=num_crops)
    prompt = "<|user|>\n<|image_1|>\nDescribe this image in detail.<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, images, return_tensors="pt").to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return inputs["input_ids"].shape[1], text


def test_jobs_of_different_num_crops_run_together_and_each_equals_its_own_generate(phi3v_stack, phi3v_reference,
                                                                                   phi3v_path, image_root):
    client = Client(phi3v_stack.api_url, key=phi3v_stack.api_key, timeout_s=30)
    crops = [1, 16, 4]
    # Submitted at once: the worker's GPU thread takes them into one run (rows join while others decode).
    with ThreadPoolExecutor(len(crops)) as pool:
        queued = list(pool.map(lambda n: client.submit("describe", ["bar_chart.png"], max_new_tokens=24,
                                                       num_crops=n), crops))
    assert [job["num_crops"] for job in queued] == crops
    _, model = phi3v_reference
    image = [Image.open(image_root / "bar_chart.png").convert("RGB")]
    lengths = set()
    for job, n in zip(queued, crops, strict=True):
        finished = client.wait(job["id"], 120)
        assert finished["status"] == "succeeded" and finished["num_crops"] == n, finished
        length, text = reference_tokens(phi3v_path, model, image, n, 24)
        assert finished["result"]["tokens"]["prompt"] == length, f"num_crops={n}"
        assert finished["result"]["text"] == text, f"num_crops={n}"
        lengths.add(length)
    assert len(lengths) == 3  # the counts change the prompt: the comparison is not vacuous


@pytest.mark.parametrize("crops", [0, 17])
def test_num_crops_out_of_range_is_refused(phi3v_stack, crops):
    response = requests.post(f"{phi3v_stack.api_url}/v1/jobs", timeout=10,
                             headers={"Authorization": f"Bearer {phi3v_stack.api_key}"},
                             json={"task": "describe", "images": ["bar_chart.png"], "num_crops": crops})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_num_crops"


def test_the_worker_prepares_its_jobs_in_its_own_preprocessing_process(phi3v_stack):
    from shared.store.workers import WorkerRegistry

    info = WorkerRegistry(phi3v_stack.redis_client()).info(phi3v_stack.worker_name)
    children = Path(f"/proc/{info['pid']}/task/{info['pid']}/children").read_text().split()
    assert len(info["preprocess_pids"]) == 1 and str(info["preprocess_pids"][0]) in children, info
