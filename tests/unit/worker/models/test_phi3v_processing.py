"""Phi-3-vision image processor and processor (transformers 5.x port): token counts, layout, batching, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tests.images import random_image
from worker.models.phi3v import Phi3VImageProcessor, Phi3VProcessor
from worker.prompts import phi3_prompt

# preprocessor_config.json of microsoft/Phi-3-vision-128k-instruct, verbatim.
CHECKPOINT_CONFIG = {
    "auto_map": {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    },
    "num_crops": 16,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Phi3VProcessor",
    "num_img_tokens": 144,
}
OPENAI_MEAN = CHECKPOINT_CONFIG["image_mean"]
OPENAI_STD = CHECKPOINT_CONFIG["image_std"]
SPECIAL = ["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>", "<|image_1|>", "<|image_2|>"]
WORDS = ["what", "is", "in", "the", "image", "compare", "and", "describe", "?", "."]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer that, like Phi-3's Llama tokenizer, prepends <s> to every encoded text."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|end|>"
    )


def prompt(question: str, num_images: int) -> str:
    return phi3_prompt(num_images, question)


@pytest.fixture
def processor() -> Phi3VProcessor:
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4), tiny_tokenizer())


def token_count(width: int, height: int, num_crops: int) -> int:
    """The original formula on the HD size, worked by hand: crops_h x crops_w sub-images + global, newlines, sep."""
    h, w = Phi3VImageProcessor(num_crops=num_crops)(random_image(width, height, 0))["image_sizes"][0]
    return int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)


@pytest.mark.parametrize("num_crops, expected", [(4, 757), (16, 2509)])
def test_square_336_image_token_count(num_crops, expected):
    image_processor = Phi3VImageProcessor(num_crops=num_crops)
    out = image_processor(random_image(336, 336, 1), return_tensors="pt")
    assert out["num_img_tokens"].tolist() == [expected]
    assert image_processor.calc_num_image_tokens_from_image_size(336, 336) == expected
    processor = Phi3VProcessor(image_processor, tiny_tokenizer())
    ids = processor(prompt("what is in the image ?", 1), random_image(336, 336, 1))["input_ids"]
    assert int((ids == -1).sum()) == expected


@pytest.mark.parametrize(
    "size, num_crops, hd_size, expected",
    [
        # 500x300: ratio 5/3; scale 2 (2*ceil(1.2)=4<=4) -> 672x403, padded to 672x672.
        ((500, 300), 4, [672, 672], 757),
        # scale 5 (5*ceil(3)=15<=16) -> 1680x1008: 3x5 crops -> (15+1)*144 + 1 + 4*12.
        ((500, 300), 16, [1008, 1680], 2353),
        # Portrait: the transform runs on the transpose, so 5 crop rows -> (15+1)*144 + 1 + 6*12.
        ((300, 500), 16, [1680, 1008], 2377),
        # ratio 5: scale 8 (8*ceil(1.6)=16) -> 2688x537, padded to 2688x672: 2x8 crops.
        ((1000, 200), 16, [672, 2688], 2485),
        ((1000, 200), 4, [336, 1344], 745),
    ],
)
def test_non_square_token_count(size, num_crops, hd_size, expected):
    image_processor = Phi3VImageProcessor(num_crops=num_crops)
    out = image_processor(random_image(*size, 2), return_tensors="pt")
    assert out["image_sizes"].tolist() == [hd_size]
    assert out["num_img_tokens"].tolist() == [expected] == [token_count(*size, num_crops)]
    assert image_processor.calc_num_image_tokens_from_image_size(*size) == expected
    assert image_processor.calc_num_image_tokens(random_image(*size, 2)) == [expected]


def test_pixel_values_shapes_and_layout():
    image_processor = Phi3VImageProcessor(num_crops=4)
    white = Image.new("RGB", (500, 300), (255, 255, 255))
    out = image_processor([random_image(1000, 200, 3), white], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].tolist() == [[336, 1344], [672, 672]]
    # 1000x200 at 4 crops is a single row of 4 crops: global + 4, no padding.
    assert out["pixel_values"][0].abs().flatten(1).sum(1).gt(0).all()
    white_value = (1 - torch.tensor(image_processor.image_mean)) / torch.tensor(image_processor.image_std)
    # An all-white image stays white after white padding: every crop and the global image are that value.
    torch.testing.assert_close(out["pixel_values"][1], white_value[None, :, None, None].expand(5, 3, 336, 336))


def test_zero_padding_of_missing_crops():
    out = Phi3VImageProcessor(num_crops=16)([random_image(336, 336, 4), random_image(400, 300, 5)], return_tensors="pt")
    # 336x336 at 16 crops -> 4x4 crops (all 17 slots used); 400x300 -> 1344x1008, 3x4 crops, slots 13..16 zero.
    assert out["pixel_values"].shape == (2, 17, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[1344, 1344], [1008, 1344]]
    assert out["pixel_values"][0].flatten(1).abs().sum(1).gt(0).all()
    assert out["pixel_values"][1, 13:].abs().sum() == 0
    assert out["pixel_values"][1, :13].flatten(1).abs().sum(1).gt(0).all()


@pytest.mark.parametrize("sizes, num_crops", [([(336, 336)], 4), ([(400, 300), (300, 420)], 16), ([(1000, 200)], 4)])
def test_crops_written_in_place_equal_the_originals_concatenation(sizes, num_crops):
    """write_crops against the original's formulation (global view, crops by reshape, concatenated, zero-padded,
    stacked), bit for bit."""
    from worker.models.phi3v.image_processing_phi3_v import hd_transform, to_normalized_tensor

    images = [random_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    got = Phi3VImageProcessor(num_crops=num_crops)(images, return_tensors="pt")["pixel_values"]
    expected = []
    for image in images:
        hd = to_normalized_tensor(hd_transform(image, num_crops), OPENAI_MEAN, OPENAI_STD)
        _, height, width = hd.shape
        glob = torch.nn.functional.interpolate(hd.unsqueeze(0), size=(336, 336), mode="bicubic")
        crops = hd.reshape(1, 3, height // 336, 336, width // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336,
                                                                                                          336)
        both = torch.cat([glob, crops])
        expected.append(torch.cat([both, both.new_zeros((num_crops + 1 - len(both), 3, 336, 336))]))
    assert torch.equal(got, torch.stack(expected))


def test_hd_padding_is_white_and_centred():
    out = Phi3VImageProcessor(num_crops=4)(random_image(500, 300, 6), return_tensors="pt")
    # 672x403 resized, padded with int(269 / 2) = 134 white rows on top and 135 at the bottom.
    first_crop = out["pixel_values"][0, 1]
    white = ((1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD))[:, None]
    torch.testing.assert_close(first_crop[:, :134, 0], white.expand(3, 134))
    assert not torch.allclose(first_crop[:, 134, :], white.expand(3, 336))


def test_checkpoint_config_round_trip(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "preprocessor_config.json").write_text(json.dumps(CHECKPOINT_CONFIG))
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path / "checkpoint")
    assert loaded.num_crops == 16 and loaded.num_img_tokens == 144
    assert list(loaded.image_mean) == OPENAI_MEAN and list(loaded.image_std) == OPENAI_STD

    loaded.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Phi3VImageProcessor"
    assert "auto_map" not in saved  # must not point back at the remote code
    reloaded = Phi3VImageProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.to_dict() == loaded.to_dict()
    image = random_image(640, 480, 7)
    torch.testing.assert_close(reloaded(image)["pixel_values"], loaded(image)["pixel_values"], rtol=0, atol=0)


def test_single_prompt_layout(processor):
    tokenizer = processor.tokenizer
    image = random_image(500, 300, 8)
    text = "<|user|>\n<|image_1|>\nwhat is in the image ?<|end|>\n<|assistant|>\n"
    out = processor(text, image)
    # The original layout: each chunk tokenized with its own <s>, the tag replaced by -1 x num_img_tokens.
    expected = tokenizer("<|user|>\n").input_ids + [-1] * 757
    expected += tokenizer("\nwhat is in the image ?<|end|>\n<|assistant|>\n").input_ids
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert out["image_sizes"].tolist() == [[672, 672]]


def test_single_prompt_two_images_repeated_tag(processor):
    images = [random_image(336, 336, 9), random_image(1000, 200, 10)]
    text = "<|image_2|> compare <|image_1|> and <|image_2|>"
    out = processor(text, images)
    counts = processor.calc_num_image_tokens(images)
    ids = out["input_ids"][0].tolist()
    assert ids.count(-1) == counts[0] and ids.count(-2) == 2 * counts[1]
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)


def test_batch_matches_single_calls(processor):
    images = [[random_image(336, 336, 11)], [random_image(500, 300, 12), random_image(200, 640, 13)],
              [random_image(1000, 200, 14)]]
    texts = [prompt("what is in the image ?", 1), prompt("compare", 2), prompt("describe the image .", 1)]
    batch = processor(texts, [image for group in images for image in group])
    singles = [processor(text, group) for text, group in zip(texts, images, strict=True)]

    width = max(single["input_ids"].shape[1] for single in singles)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    for row, single in enumerate(singles):
        length = single["input_ids"].shape[1]
        assert batch["input_ids"][row, width - length:].tolist() == single["input_ids"][0].tolist()
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert batch["input_ids"][row, : width - length].eq(processor.tokenizer.pad_token_id).all()
    torch.testing.assert_close(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]), rtol=0, atol=0)
    assert batch["image_sizes"].tolist() == [size for s in singles for size in s["image_sizes"].tolist()]


def test_batch_without_images_and_errors(processor):
    out = processor(["what is it ?", "describe the image in the image ."])  # 5 and 8 tokens with <s>
    assert out["input_ids"].shape == (2, 8) and "pixel_values" not in out
    assert out["input_ids"][0].tolist() == [processor.tokenizer.pad_token_id] * 3 + processor.tokenizer(
        "what is it ?").input_ids
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
    with pytest.raises(ValueError, match="images in all"):
        processor([prompt("what", 1), prompt("what", 1)], [random_image(336, 336, 15)])
    with pytest.raises(ValueError, match="numbered 1..k"):
        processor([prompt("what", 1), "<|image_2|> what"], [random_image(336, 336, 15)] * 2)


def test_text_only_single_prompt_is_plain_tokenization(processor):
    out = processor("what is in the image ?")
    assert out["input_ids"].tolist() == [processor.tokenizer("what is in the image ?").input_ids]


def test_decode_passthrough(processor):
    ids = processor.tokenizer("what is in the image ?").input_ids
    assert processor.decode(ids, skip_special_tokens=True) == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert processor.batch_decode([ids, ids]) == processor.tokenizer.batch_decode([ids, ids])


def test_processor_save_and_load(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, Phi3VImageProcessor) and loaded.image_processor.num_crops == 4
    text, image = prompt("what is in the image ?", 1), random_image(500, 300, 16)
    assert loaded(text, image)["input_ids"].tolist() == processor(text, image)["input_ids"].tolist()
