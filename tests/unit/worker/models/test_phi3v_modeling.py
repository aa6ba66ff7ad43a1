"""Phi-3-vision model port (transformers 5.x): checkpoint key set, config, HD merge, batching, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from cli.tiny_model import build_tiny_phi3v
from tests.images import random_image
from tests.paths import DATA
from worker.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from worker.models.phi3v.modeling_phi3_v import merge_2x2
from worker.prompts import phi3_prompt

# config.json of microsoft/Phi-3-vision-128k-instruct (bench/phi3v_gpu.py builds the real shape from it too).
CHECKPOINT_CONFIG = json.loads((DATA / "phi3_vision_128k_config.json")
                               .read_text())
LONG_FACTOR = CHECKPOINT_CONFIG["rope_scaling"]["long_factor"]
SHORT_FACTOR = CHECKPOINT_CONFIG["rope_scaling"]["short_factor"]


def checkpoint_keys(text_layers: int = 32, vision_layers: int = 24) -> set[str]:
    """The checkpoint's tensor names, from the original module tree (modeling/image_embedding_phi3_v.py).

    The original's `vision_embed_tokens.wte` is the same module as `model.embed_tokens`; save_pretrained drops such
    aliases (keeping the first name), so the checkpoint holds `model.embed_tokens.weight` only.
    """
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(text_layers):
        keys |= {f"model.layers.{i}.{name}.weight" for name in (
            "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
            "input_layernorm", "post_attention_layernorm")}
    vision = "model.vision_embed_tokens"
    keys |= {f"{vision}.glb_GN", f"{vision}.sub_GN"}
    keys |= {f"{vision}.img_projection.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    tower = f"{vision}.img_processor.vision_model"
    keys |= {f"{tower}.embeddings.class_embedding", f"{tower}.embeddings.patch_embedding.weight",
             f"{tower}.embeddings.position_embedding.weight"}
    keys |= {f"{tower}.{norm}.{p}" for norm in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")}
    for i in range(vision_layers):
        names = [f"self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
        keys |= {f"{tower}.encoder.layers.{i}.{name}.{p}" for name in names for p in ("weight", "bias")}
    return keys


def checkpoint_config() -> Phi3VConfig:
    return Phi3VConfig.from_dict(json.loads(json.dumps(CHECKPOINT_CONFIG)))


def prompt(question: str, num_images: int) -> str:
    return phi3_prompt(num_images, question)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_phi3v(tmp_path_factory.mktemp("models") / "tiny-phi3v")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    processor = AutoProcessor.from_pretrained(tiny_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=torch.float32).eval()
    return processor, model


def test_state_dict_matches_checkpoint_keys():
    with torch.device("meta"):
        model = Phi3VForCausalLM(checkpoint_config())
    state = model.state_dict()
    expected = checkpoint_keys()
    assert len(expected) == 592
    assert sorted(set(state) - expected) == []  # unexpected in the port
    assert sorted(expected - set(state)) == []  # missing from the port
    assert state["model.vision_embed_tokens.glb_GN"].shape == (1, 1, 4096)
    assert state["model.vision_embed_tokens.sub_GN"].shape == (1, 1, 1, 4096)
    assert state["model.vision_embed_tokens.img_projection.0.weight"].shape == (3072, 4096)
    assert state["model.vision_embed_tokens.img_projection.2.weight"].shape == (3072, 3072)
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * 3072, 3072)
    assert state["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 8192, 3072)
    tower = "model.vision_embed_tokens.img_processor.vision_model"
    assert state[f"{tower}.embeddings.position_embedding.weight"].shape == (577, 1024)
    # torch's strict loading of the checkpoint's key set: nothing missing, nothing unexpected.
    result = model.load_state_dict({key: torch.empty_like(value) for key, value in state.items()}, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_checkpoint_config_gives_longrope():
    config = checkpoint_config()
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["short_factor"] == SHORT_FACTOR and rope["long_factor"] == LONG_FACTOR
    assert rope["original_max_position_embeddings"] == 4096 and rope["rope_theta"] == 10000.0
    assert config.vision_config.hidden_size == config.img_processor["image_dim_out"] == 1024
    assert config.vision_config.hidden_act == "quick_gelu" and config.vision_config.num_hidden_layers == 24
    assert config._attn_implementation is None  # the pinned flash_attention_2 is not kept
    rotary = Phi3RotaryEmbedding(config=config)
    # The original "su" embedding: cos/sin scaled by sqrt(1 + ln(131072 / 4096) / ln(4096)), short factors <= 4096.
    assert rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    dim = 3072 // 32
    expected = 1.0 / (torch.tensor(SHORT_FACTOR) * 10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    torch.testing.assert_close(rotary.inv_freq.float(), expected)


def test_saved_config_reloads_identically(tmp_path):
    config = checkpoint_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == "phi3_v"
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, Phi3VConfig)
    assert reloaded.rope_parameters == config.rope_parameters
    assert reloaded.vision_config.to_dict() == config.vision_config.to_dict()


def test_merge_2x2_layout():
    """Token (r, c) of the stitched grid holds patches (2r + dr, 2c + dc) of the right crop, channels (dr, dc, C)."""
    h_crops, w_crops, side, channels = 2, 3, 4, 2
    patches = torch.randn(h_crops * w_crops, side * side, channels)
    merged = merge_2x2(patches, h_crops, w_crops)
    assert merged.shape == (1, h_crops * side // 2, w_crops * side // 2, 4 * channels)
    grid = patches.reshape(h_crops, w_crops, side, side, channels)
    for row in range(h_crops * side // 2):
        for col in range(w_crops * side // 2):
            crop_r, r = divmod(row, side // 2)
            crop_c, c = divmod(col, side // 2)
            block = grid[crop_r, crop_c, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)
            torch.testing.assert_close(merged[0, row, col], block)


def test_hd_sequence_order(tiny):
    """sub-image grid rows each closed by sub_GN, then glb_GN, then the global image rows closed by sub_GN."""
    _, model = tiny
    embedding = model.model.vision_embed_tokens
    dim = 4 * embedding.image_dim_out
    features = torch.randn(1, 5, 576, embedding.image_dim_out)  # global + 4 crops of a 672x672 HD image
    with torch.no_grad():
        tokens = embedding.hd_feature_transform(features, [[672, 672]])
    assert tokens.shape == (24 * 25 + 1 + 12 * 13, dim)
    sub, glb = embedding.sub_GN.reshape(dim), embedding.glb_GN.reshape(dim)
    for row in range(24):
        torch.testing.assert_close(tokens[row * 25 + 24], sub)
    torch.testing.assert_close(tokens[600], glb)
    for row in range(12):
        torch.testing.assert_close(tokens[601 + row * 13 + 12], sub)
    torch.testing.assert_close(tokens[601:601 + 12], merge_2x2(features[:, 0], 1, 1)[0, 0])


@pytest.mark.parametrize("num_crops, expected", [(4, 757), (16, 2509)])
def test_image_token_count_through_model(tiny, num_crops, expected):
    processor, model = tiny
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), processor.tokenizer)
    inputs = processor(prompt("Describe this image in detail.", 1), [random_image(336, 336, 1)])
    with torch.no_grad():
        features = model.model.vision_embed_tokens(inputs["pixel_values"], inputs["image_sizes"])
    assert features.shape == (expected, model.config.hidden_size)
    assert int((inputs["input_ids"] == -1).sum()) == expected


def test_image_features_reach_the_decoder(tiny):
    """Changing the pixels changes the logits; the text embedding of a clamped id (0) is not what is used."""
    processor, model = tiny
    text = prompt("Describe this image in detail.", 1)
    first = processor(text, [random_image(400, 300, 2)])
    second = processor(text, [random_image(400, 300, 3)])
    with torch.no_grad():
        a = model(**first).logits[0, -1]
        b = model(**second).logits[0, -1]
    assert not torch.allclose(a, b)


def test_negative_ids_without_pixels_is_an_error(tiny):
    processor, model = tiny
    inputs = processor(prompt("Describe this image in detail.", 1), [random_image(336, 336, 4)])
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def generate(model, inputs, max_new_tokens=12):
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[:, inputs["input_ids"].shape[1]:]


def test_batched_equals_sequential(tiny):
    processor, model = tiny
    jobs = [
        (prompt("Describe this image in detail.", 1), [random_image(500, 300, 10)]),
        (prompt("What is the difference between these images?", 2), [random_image(336, 336, 11),
                                                                      random_image(200, 420, 12)]),
        (prompt("Extract all the text in this image, in reading order.", 1), [random_image(900, 160, 13)]),
    ]
    singles = [generate(model, processor(text, images))[0] for text, images in jobs]
    batch = processor([text for text, _ in jobs], [image for _, images in jobs for image in images])
    assert (batch["attention_mask"] == 0).any()  # the rows really are left-padded
    batched = generate(model, batch)
    pad = model.generation_config.pad_token_id
    for row, single in zip(batched, singles, strict=True):
        assert row[:len(single)].tolist() == single.tolist()
        assert (row[len(single):] == pad).all()  # finished early: only padding follows
    assert max(len(single) for single in singles) > 3  # the damped specials let generations run


def test_round_trip_through_auto_classes(tiny, tiny_path, tmp_path):
    processor, model = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert keys == checkpoint_keys(text_layers=2, vision_layers=2)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(reloaded, Phi3VForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), Phi3VForCausalLM)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded_processor, Phi3VProcessor)
    assert reloaded_processor.image_processor.num_crops == 4
    inputs = reloaded_processor(prompt("Describe this image in detail.", 1), [random_image(300, 500, 5)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    assert generate(reloaded, inputs).tolist() == generate(model, inputs).tolist()


def test_checkpoint_with_wte_alias_loads(tiny, tmp_path):
    """A copy that kept the original's `vision_embed_tokens.wte` alias loads without unexpected keys."""
    processor, model = tiny
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.vision_embed_tokens.wte.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_attn_implementation_reaches_both_towers(tiny_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
