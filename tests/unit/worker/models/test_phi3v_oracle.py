"""The native Phi-3-vision port against the original remote code (transformers 4.48.3), run once as an oracle
by tools/phi3v_oracle/make_oracle.py on tiny random weights: same input ids and image layout, the same pixels,
logits within 1e-4 (fp32) and the same greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import worker.models.phi3v  # noqa: F401  (registers the port with the Auto classes)
from tests import paths

DATA = paths.DATA / "phi3v_tiny"
ORACLE = json.loads((DATA / "oracle.json").read_text())
CASES = sorted(ORACLE["cases"])


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def port(request):
    processor = AutoProcessor.from_pretrained(DATA)
    model = AutoModelForImageTextToText.from_pretrained(DATA, dtype=torch.float32, attn_implementation=request.param)
    return processor, model.eval()


def inputs_for(processor, case: dict):
    images = [Image.open(DATA / name).convert("RGB") for name in case["images"]]
    return processor(case["prompt"], images, return_tensors="pt")


def test_checkpoint_keys_load_with_nothing_missing_or_unexpected(port):
    _, model = port
    with safe_open(DATA / "model.safetensors", "pt") as weights:
        saved = set(weights.keys())
    assert saved == set(model.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_processor_gives_the_original_ids_layout_and_pixels(port, name):
    processor, _ = port
    case, inputs = ORACLE["cases"][name], inputs_for(port[0], ORACLE["cases"][name])
    ids = inputs["input_ids"][0]
    assert ids.tolist() == case["input_ids"]
    for image, where in case["image_token_positions"].items():
        positions = (ids == -int(image)).nonzero().flatten()
        assert (positions[0].item(), positions[-1].item() + 1, len(positions)) == (where["start"], where["end"],
                                                                                  where["count"])
    assert inputs["image_sizes"].tolist() == case["image_sizes"]
    pixels = inputs["pixel_values"]
    assert list(pixels.shape) == case["pixel_values"]["shape"]
    assert pixels.sum().item() == pytest.approx(case["pixel_values"]["sum"], rel=1e-6, abs=1e-2)
    assert pixels.abs().sum().item() == pytest.approx(case["pixel_values"]["abs_sum"], rel=1e-6)
    for img, crop, ch, y, x, value in case["pixel_values"]["samples_[img,crop,ch,y,x,value]"]:
        assert pixels[img, crop, ch, y, x].item() == pytest.approx(value, abs=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_logits_match_the_original_within_1e_4(port, name):
    processor, model = port
    case, inputs = ORACLE["cases"][name], inputs_for(processor, ORACLE["cases"][name])
    with torch.inference_mode():
        logits = model(**inputs).logits[0]
    expected = case["logits"]
    assert list(logits.shape) == expected["shape"][1:]
    torch.testing.assert_close(logits[-1], torch.tensor(expected["last"]), atol=1e-4, rtol=0)
    for position, row in expected["rows_at_positions"].items():
        torch.testing.assert_close(logits[int(position)], torch.tensor(row), atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == expected["argmax"]
    assert logits.mean().item() == pytest.approx(expected["mean"], abs=1e-5)
    assert logits.std().item() == pytest.approx(expected["std"], abs=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match_the_original(port, name):
    processor, model = port
    case, inputs = ORACLE["cases"][name], inputs_for(processor, ORACLE["cases"][name])
    with torch.inference_mode():
        output = model.generate(**inputs, **ORACLE["meta"]["generate_kwargs"])
    assert output[0, inputs["input_ids"].shape[1]:].tolist() == case["generate"]["new_tokens"]
