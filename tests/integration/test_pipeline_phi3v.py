"""The whole path on the tiny native Phi-3-vision: the worker picks the port for model_type phi3_v and prompts it
the Phi-3 cookbook way; results equal a direct greedy `generate`."""

from __future__ import annotations

import pytest
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
    env = {**settings_env(phi3v), "VISIONQ_QUEUE": "visionq-phi3v"}
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
