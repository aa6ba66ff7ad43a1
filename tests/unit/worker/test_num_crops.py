"""Jobs of different crop counts decode together on the tiny Phi-3-vision: one prefill carries images of 2 and
17 crops (zero-padded to the larger), and each row equals that prompt's own `generate` with its num_crops."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import worker.models.phi3v  # noqa: F401  (Auto registration)
from tests.images import random_image
from worker.decoding import Decoder, Prompt
from worker.prompts import phi3_prompt

TEXT = phi3_prompt(1, "Describe this image in detail.")


@pytest.fixture(scope="module")
def phi3v(tmp_path_factory):
    from cli.tiny_model import build_tiny_phi3v

    path = build_tiny_phi3v(tmp_path_factory.mktemp("phi3v") / "model")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return path, AutoProcessor.from_pretrained(path), model


def reference(path, model, image, num_crops: int, max_new_tokens: int) -> tuple[int, list[int]]:
    """The prompt length and greedy tokens of transformers' `generate`, the processor loaded at `num_crops`."""
    processor = AutoProcessor.from_pretrained(path, num_crops=num_crops)
    inputs = processor(TEXT, [image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs["input_ids"].shape[1], out[0, inputs["input_ids"].shape[1]:].tolist()


def test_one_batch_of_different_crop_counts_equals_each_prompts_own_generate(phi3v):
    path, processor, model = phi3v
    images = [random_image(480, 320, seed=1), random_image(480, 320, seed=2), random_image(300, 450, seed=3)]
    crops = [1, 16, 4]
    prompts = [Prompt(dict(processor(TEXT, [image], return_tensors="pt", num_crops=n)), 10)
               for image, n in zip(images, crops, strict=True)]
    assert [p.inputs["pixel_values"].shape[1] for p in prompts] == [2, 17, 5]  # the global view and the crops
    done = {}
    decoder = Decoder(model, [model.generation_config.eos_token_id], processor.tokenizer.pad_token_id,
                      use_graphs=False, kv_budget_bytes=1 << 30)
    decoder.generate(prompts, lambda row, completion: done.__setitem__(row, completion.tokens))
    for row, (image, n) in enumerate(zip(images, crops, strict=True)):
        length, tokens = reference(path, model, image, n, 10)
        assert prompts[row].length == length, f"num_crops={n}"
        assert done[row] == tokens, f"num_crops={n}"
    assert len({p.length for p in prompts}) == 3  # the counts change the prompts: the check is not vacuous


def test_the_engine_passes_num_crops_to_phi3v_and_a_model_without_it_fails_the_job(phi3v, tiny_model_path):
    from shared.config import Settings
    from shared.errors import NumCropsUnsupported
    from worker.engine import Engine

    image = random_image(480, 320, seed=1)
    phi3v_engine = Engine(Settings(model=str(phi3v[0]), device="cpu"))
    assert phi3v_engine.takes_num_crops
    assert phi3v_engine.prepare([image], "Describe.", 4, num_crops=16).inputs["pixel_values"].shape[1] == 17
    assert phi3v_engine.prepare([image], "Describe.", 4).inputs["pixel_values"].shape[1] == 5  # its processor's 4
    llava = Engine(Settings(model=str(tiny_model_path), device="cpu"))
    assert not llava.takes_num_crops
    with pytest.raises(NumCropsUnsupported):  # VISIONQ_NUM_CROPS_MODELS named it wrongly: the job fails, coded
        llava.prepare([image], "Describe.", 4, num_crops=4)
