#!/usr/bin/env python
"""Build the Phi-3-vision ORACLE test data (tiny random model + outputs of the ORIGINAL remote code).

Run with a throw-away venv that has transformers==4.48.3 (see README.md next to this file):

    /tmp/oracle-venv/bin/python tools/phi3v_oracle/make_oracle.py \
        --original /tmp/phi3v_original --out tests/data/phi3v_tiny

--original is a folder holding the original remote-code files of microsoft/Phi-3-vision-128k-instruct
(configuration_phi3_v.py, modeling_phi3_v.py, image_embedding_phi3_v.py, processing_phi3_v.py,
image_processing_phi3_v.py).  They are NOT part of this repository.  This script copies them to a
temporary package, applies the small patches listed in PATCHES (each must match exactly once), and
imports them from there; the folder given with --original is never modified.

It writes into --out: config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, model.safetensors, the PNG test images and oracle.json.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SEED = 1234
PKG = "phi3v_orig"

# ---------------------------------------------------------------------------------------------
# Patches applied (at run time, to a temporary copy) to the original remote code.
# (file, old text, new text, why).  Each `old` must occur exactly once.
# ---------------------------------------------------------------------------------------------
PATCHES = [
    (
        "image_embedding_phi3_v.py",
        "            clip_config = CLIP_VIT_LARGE_PATCH14_336_CONFIG\n",
        "            clip_config = CLIPVisionConfig(**config.vision_config) if getattr(config, 'vision_config', None) else CLIP_VIT_LARGE_PATCH14_336_CONFIG  # ORACLE PATCH 1\n",
        "tiny CLIP tower: use config.vision_config (a dict of CLIPVisionConfig kwargs) when present, "
        "else the hard-coded ViT-L/14-336 config (unchanged behaviour for the real checkpoint)",
    ),
    (
        "image_embedding_phi3_v.py",
        "assert L == 24 * 24 and C == 1024 and N % (h_crop * w_crop) == 0",
        "assert L == 24 * 24 and C == self.image_dim_out and N % (h_crop * w_crop) == 0  # ORACLE PATCH 2",
        "the shape assertion hard-codes the ViT-L width 1024; compare with image_dim_out instead "
        "(identical for the real checkpoint, where image_dim_out == 1024)",
    ),
]

PROMPTS = {
    "describe": "<|user|>\n<|image_1|>\nDescribe this image in detail.<|end|>\n<|assistant|>\n",
    "compare": "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is the difference between these images?<|end|>\n<|assistant|>\n",
    "ocr": "<|user|>\n<|image_1|>\nExtract all the text in this image, in reading order.<|end|>\n<|assistant|>\n",
}
CASE_IMAGES = {
    "describe": ["describe_336x336.png"],
    "compare": ["compare_a_500x300.png", "compare_b_300x420.png"],
    "ocr": ["ocr_640x200.png"],
}
MAX_NEW_TOKENS = 16

TOKENIZER_CORPUS = [
    "Describe this image in detail.",
    "What is the difference between these images?",
    "Extract all the text in this image, in reading order.",
    "The image shows a red circle, a blue square and a green triangle on a white background.",
    "The first image is brighter than the second image, and the second image has more shapes.",
    "There is some text in the picture: Hello World, invoice number 42, total amount due.",
    "A cat is sitting on the table next to a cup of coffee and a small plant.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "In the top left corner there is a logo, and in the bottom right corner a date is printed.",
    "Colors, shapes, gradients, lines, letters and numbers can be seen in these images.",
    "Please answer the question about the picture with a short and precise sentence.",
    "Visionq runs vision language model jobs and returns the generated text to the user.",
]
# Phi-3 specials.  <unk>, <s>, </s> get ids 0, 1, 2 (as in the Llama/Phi-3 vocabulary); the chat
# tokens are appended after the trained byte-level BPE vocabulary.
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)

# The checkpoint's preprocessor_config.json (microsoft/Phi-3-vision-128k-instruct, public copy in
# g1y5x3/vlm-study) with num_crops 16 -> 4.
PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    },
    "num_crops": 4,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Phi3VProcessor",
    "num_img_tokens": 144,
}

VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "num_channels": 3,
}


def _r(x, nd=6):
    return float(round(float(x), nd))


# ---------------------------------------------------------------------------------------------
def import_original(original_dir):
    """Copy the original files into a temp package, apply PATCHES, import it."""
    tmp = tempfile.mkdtemp(prefix="phi3v_oracle_")
    pkg_dir = os.path.join(tmp, PKG)
    os.makedirs(pkg_dir)
    names = [
        "configuration_phi3_v.py",
        "modeling_phi3_v.py",
        "image_embedding_phi3_v.py",
        "processing_phi3_v.py",
        "image_processing_phi3_v.py",
    ]
    sources = {}
    for n in names:
        with open(os.path.join(original_dir, n), encoding="utf-8") as f:
            sources[n] = f.read()
    applied = []
    for fname, old, new, why in PATCHES:
        cnt = sources[fname].count(old)
        if cnt != 1:
            raise SystemExit(f"patch for {fname} matched {cnt} times (expected 1): {old!r}")
        sources[fname] = sources[fname].replace(old, new)
        applied.append({"file": fname, "old": old.strip(), "new": new.strip(), "why": why})
    for n, src in sources.items():
        with open(os.path.join(pkg_dir, n), "w", encoding="utf-8") as f:
            f.write(src)
    with open(os.path.join(pkg_dir, "__init__.py"), "w") as f:
        f.write("")
    # package import for modeling (relative imports); the processing file of the public copy does
    # `from image_processing_phi3_v import ...` (absolute), so the package folder goes on sys.path too.
    sys.path.insert(0, tmp)
    sys.path.insert(0, pkg_dir)
    import importlib

    mods = {
        "config": importlib.import_module(f"{PKG}.configuration_phi3_v"),
        "modeling": importlib.import_module(f"{PKG}.modeling_phi3_v"),
        "image_processing": importlib.import_module(f"{PKG}.image_processing_phi3_v"),
        "processing": importlib.import_module(f"{PKG}.processing_phi3_v"),
    }
    hashes = {n: hashlib.sha256(sources[n].encode()).hexdigest()[:16] for n in names}
    return mods, applied, hashes


# ---------------------------------------------------------------------------------------------
def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500 - len(CHAT_SPECIALS),
        min_frequency=1,
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(CHAT_SPECIALS)
    assert [tok.token_to_id(t) for t in BASE_SPECIALS] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    # save_pretrained may write the template to a separate file in some versions; keep it in tokenizer_config.json
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["chat_template"] = CHAT_TEMPLATE
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("auto_map", None)
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for extra in ("chat_template.jinja", "chat_template.json"):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    return fast


# ---------------------------------------------------------------------------------------------
def make_images(out_dir):
    """Deterministic test images (shapes, gradients, text)."""
    font = ImageFont.load_default()
    imgs = {}

    # (a) 336x336: diagonal RGB gradient + shapes
    w, h = 336, 336
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // (w - 1)), (yy * 255 // (h - 1)), ((xx + yy) * 255 // (w + h - 2))], -1).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    d.ellipse([30, 30, 150, 150], fill=(220, 20, 60), outline=(0, 0, 0), width=3)
    d.rectangle([180, 40, 300, 160], fill=(30, 60, 200))
    d.polygon([(60, 300), (168, 190), (276, 300)], fill=(20, 160, 40))
    d.line([(0, 335), (335, 0)], fill=(255, 255, 255), width=4)
    d.text((120, 170), "visionq", fill=(0, 0, 0), font=font)
    imgs["describe_336x336.png"] = im

    # (b1) 500x300: horizontal stripes + circles
    w, h = 500, 300
    arr = np.zeros((h, w, 3), np.uint8)
    for i in range(0, h, 20):
        arr[i : i + 10] = ((i * 7) % 256, (i * 3 + 80) % 256, (255 - i) % 256)
    arr[:, :, 2] = np.clip(arr[:, :, 2].astype(int) + (np.arange(w)[None, :] // 4), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for k in range(5):
        d.ellipse([20 + 95 * k, 100, 90 + 95 * k, 170], fill=(255, 200 - 30 * k, 30 * k), outline=(0, 0, 0))
    d.text((10, 260), "left image: five circles", fill=(255, 255, 255), font=font)
    imgs["compare_a_500x300.png"] = im

    # (b2) 300x420: radial gradient + squares
    w, h = 300, 420
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt((xx - w / 2) ** 2 + (yy - h / 2) ** 2)
    r = (r / r.max() * 255).astype(np.uint8)
    arr = np.stack([255 - r, r // 2, r], -1).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for k in range(3):
        d.rectangle([40 + 60 * k, 60 + 100 * k, 110 + 60 * k, 130 + 100 * k], fill=(40 * k, 255 - 60 * k, 120), outline=(255, 255, 255), width=2)
    d.text((20, 390), "right image: three squares", fill=(255, 255, 0), font=font)
    imgs["compare_b_300x420.png"] = im

    # (c) 640x200: document-like text on white
    im = Image.new("RGB", (640, 200), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 639, 30], fill=(20, 40, 90))
    d.text((10, 8), "INVOICE #2024-0042", fill=(255, 255, 255), font=font)
    lines = [
        "Bill to: Visionq Labs, 12 Example Street",
        "Item 1: GPU hours ........ 12 x 3.50 = 42.00",
        "Item 2: Storage .......... 1 x 8.00 = 8.00",
        "TOTAL DUE: 50.00 EUR",
    ]
    for i, line in enumerate(lines):
        d.text((20, 45 + 35 * i), line, fill=(0, 0, 0), font=font)
    d.line([(20, 178), (620, 178)], fill=(120, 120, 120), width=2)
    imgs["ocr_640x200.png"] = im

    for name, im in imgs.items():
        im.save(os.path.join(out_dir, name), format="PNG", optimize=True)
    # reload from disk so that the oracle sees exactly the saved pixels
    return {name: Image.open(os.path.join(out_dir, name)).convert("RGB") for name in imgs}


# ---------------------------------------------------------------------------------------------
def make_config(tokenizer):
    n_tok = len(tokenizer)
    vocab_size = int(math.ceil(n_tok / 64) * 64)
    hidden, heads = 64, 4
    half = hidden // heads // 2
    short = [round(1.0 + i * (1.0 / (half - 1)), 6) for i in range(half)]  # 1.0 .. 2.0
    long = [round(1.0 + i * (7.0 / (half - 1)), 6) for i in range(half)]  # 1.0 .. 8.0
    return {
        "_name_or_path": "phi3v-tiny-random",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        # no "auto_map" (the real config.json has one pointing at the remote code): with it, transformers 5.x
        # AutoTokenizer/AutoConfig would ask to run remote code that is not shipped in this folder.
        "bos_token_id": tokenizer.convert_tokens_to_ids("<s>"),
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|end|>"),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "img_processor": {
            "image_dim_out": VISION_CONFIG["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        "initializer_range": 0.2,  # large on purpose: varied greedy tokens from a random model
        "intermediate_size": 128,
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "original_max_position_embeddings": 4096,
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": dict(VISION_CONFIG),
    }


def perturb_and_damp(model, tokenizer, vocab_size):
    """Deterministic, non-trivial values for params that init to constants; damp special-token rows."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("glb_GN") or name.endswith("sub_GN"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        lm = model.lm_head.weight
        damped = {}
        for t in BASE_SPECIALS + CHAT_SPECIALS:
            i = tokenizer.convert_tokens_to_ids(t)
            if t == "<|end|>":
                lm[i] *= 0.5
                damped[t] = 0.5
            else:
                lm[i] *= 0.0
                damped[t] = 0.0
        n_tok = len(tokenizer)
        if vocab_size > n_tok:
            lm[n_tok:] *= 0.0  # padding rows of the rounded-up vocabulary: never produced
    return damped


# ---------------------------------------------------------------------------------------------
def tsum(t):
    t = t.detach().double()
    return {"sum": _r(t.sum().item(), 4), "abs_sum": _r(t.abs().sum().item(), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", required=True, help="folder with the original remote-code files")
    ap.add_argument("--out", required=True, help="output folder (tests/data/phi3v_tiny)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    mods, applied, hashes = import_original(os.path.abspath(args.original))
    Phi3VConfig = mods["config"].Phi3VConfig
    Phi3VForCausalLM = mods["modeling"].Phi3VForCausalLM
    Phi3VImageProcessor = mods["image_processing"].Phi3VImageProcessor
    Phi3VProcessor = mods["processing"].Phi3VProcessor

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    # 1. tokenizer + preprocessor config + images
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
        f.write("\n")
    images = make_images(out)

    # 2. config + model (original classes), seeded
    cfg = make_config(tokenizer)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    config = Phi3VConfig.from_pretrained(out)
    torch.manual_seed(SEED)
    model = Phi3VForCausalLM(config).float().eval()
    damped = perturb_and_damp(model, tokenizer, cfg["vocab_size"])

    # 3. weights: the module tree's state_dict minus the shared alias of embed_tokens
    sd = model.state_dict()
    shared = "model.vision_embed_tokens.wte.weight"
    assert sd[shared].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    to_save = {k: v.detach().contiguous().clone() for k, v in sd.items() if k != shared}
    save_file(to_save, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    # 4. reload through from_pretrained (proves the saved key set is complete) and use THAT model
    model = Phi3VForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    reloaded = model.state_dict()
    for k, v in to_save.items():
        assert torch.equal(reloaded[k], v), k
    assert torch.equal(reloaded[shared], to_save["model.embed_tokens.weight"])
    assert model.model.vision_embed_tokens.wte is model.model.embed_tokens

    image_processor = Phi3VImageProcessor.from_pretrained(out)
    processor = Phi3VProcessor(image_processor, tokenizer)

    oracle = {
        "meta": {
            "what": "outputs of the ORIGINAL microsoft/Phi-3-vision-128k-instruct remote code on the tiny random model in this folder",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "device": "cpu",
            "seed": SEED,
            "text_attn_implementation": model.config._attn_implementation,
            "clip_attn_implementation": getattr(model.model.vision_embed_tokens.img_processor.config, "_attn_implementation", None),
            "patches": applied,
            "original_sources_sha256_16": hashes,
            "saved_keys_excluded": [shared],
            "lm_head_damped_rows": damped,
            "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False},
            "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg["pad_token_id"],
            "vocab_size": cfg["vocab_size"],
            "tokenizer_len": len(tokenizer),
            "tokenizer_check": {
                "text": "Describe this image in detail.",
                "ids": tokenizer("Describe this image in detail.").input_ids,
            },
        },
        "cases": {},
    }

    for case, prompt in PROMPTS.items():
        imgs = [images[n] for n in CASE_IMAGES[case]]
        inputs = processor(prompt, imgs, return_tensors="pt")
        ids = inputs["input_ids"]
        pv = inputs["pixel_values"]
        image_sizes = inputs["image_sizes"]
        n_img_tokens = image_processor(imgs, return_tensors="pt")["num_img_tokens"]
        n_img_tokens = [int(x) for x in (n_img_tokens.tolist() if hasattr(n_img_tokens, "tolist") else n_img_tokens)]

        ids_list = ids[0].tolist()
        positions = {}
        for k in range(1, len(imgs) + 1):
            pos = [i for i, t in enumerate(ids_list) if t == -k]
            positions[str(k)] = {"start": pos[0], "end": pos[-1] + 1, "count": len(pos),
                                 "contiguous": pos == list(range(pos[0], pos[-1] + 1))}
        sample_idx = []
        for i in range(pv.shape[0]):
            for c in range(pv.shape[1]):
                sample_idx.append([i, c, c % 3, (37 * c + 11) % 336, (53 * c + 101) % 336])
        samples = [[*ix, _r(pv[tuple(ix)].item(), 6)] for ix in sample_idx]

        with torch.no_grad():
            emb = model.model.vision_embed_tokens(ids.clone(), pixel_values=pv, image_sizes=image_sizes)
            img_mask = ids[0] < 0
            emb_img = emb[0][img_mask]
            out_f = model(input_ids=ids.clone(), attention_mask=inputs["attention_mask"], pixel_values=pv,
                          image_sizes=image_sizes, use_cache=False)
            logits = out_f.logits[0].double()
            gen = model.generate(input_ids=ids.clone(), attention_mask=inputs["attention_mask"], pixel_values=pv,
                                 image_sizes=image_sizes, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new_tokens = gen.sequences[0, ids.shape[1]:].tolist()
        margins = []
        for sc in gen.scores:
            top2 = torch.topk(sc[0].double(), 2).values
            margins.append(_r((top2[0] - top2[1]).item(), 6))

        sel = sorted({positions["1"]["start"], positions["1"]["end"] - 1, positions["1"]["end"], len(ids_list) - 1})
        oracle["cases"][case] = {
            "prompt": prompt,
            "images": CASE_IMAGES[case],
            "image_pil_sizes_wh": [list(im.size) for im in imgs],
            "input_ids": ids_list,
            "input_len": len(ids_list),
            "attention_mask_sum": int(inputs["attention_mask"].sum().item()),
            "image_token_positions": positions,
            "num_img_tokens": n_img_tokens,
            "image_sizes": [list(map(int, s)) for s in (image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes)],
            "pixel_values": {
                "shape": list(pv.shape),
                "dtype": str(pv.dtype),
                **tsum(pv),
                "per_image_crop_sum": [[_r(pv[i, c].double().sum().item(), 4) for c in range(pv.shape[1])] for i in range(pv.shape[0])],
                "samples_[img,crop,ch,y,x,value]": samples,
            },
            "image_embeds": {
                "rows": int(emb_img.shape[0]),
                **tsum(emb_img),
                "first_row_first8": [_r(x) for x in emb_img[0, :8].tolist()],
                "last_row_first8": [_r(x) for x in emb_img[-1, :8].tolist()],
            },
            "logits": {
                "shape": list(out_f.logits.shape),
                "mean": _r(logits.mean().item(), 8),
                "std": _r(logits.std().item(), 8),
                "abs_sum": _r(logits.abs().sum().item(), 4),
                "last": [_r(x) for x in logits[-1].tolist()],
                "rows_at_positions": {str(p): [_r(x) for x in logits[p].tolist()] for p in sel},
                "argmax": logits.argmax(-1).tolist(),
            },
            "generate": {
                "new_tokens": new_tokens,
                "num_new_tokens": len(new_tokens),
                "top1_top2_logit_margin_per_step": margins,
                "min_margin": min(margins) if margins else None,
                "stopped_at_eos": bool(new_tokens and new_tokens[-1] == cfg["eos_token_id"] and len(new_tokens) < MAX_NEW_TOKENS),
                "text": tokenizer.decode(new_tokens, skip_special_tokens=False),
            },
        }
        print(f"[{case}] len={len(ids_list)} img_tokens={n_img_tokens} pv={list(pv.shape)} new_tokens={new_tokens}")

    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1)
        f.write("\n")
    keys = sorted(load_file(os.path.join(out, "model.safetensors")).keys())
    print(f"saved {len(keys)} tensors; files in {out}:")
    for n in sorted(os.listdir(out)):
        print(f"  {n}  {os.path.getsize(os.path.join(out, n))}")


if __name__ == "__main__":
    main()
