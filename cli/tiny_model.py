"""Build a tiny random-weight vision-language model of a real transformers architecture, in seconds.

LLaVA layout: a small CLIP vision tower, a projector and a small Llama text model, with a byte-level BPE
tokenizer trained in memory, a real CLIP image processor and a processor whose chat template renders the
Phi-3 cookbook conversation. Tests and the demo load it through the same code path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

# The chat template renders one user turn exactly as the Phi-3 cookbook does, with LLaVA's <image> token
# standing where Phi-3 puts <|image_N|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "Describe this image in detail.",
    "Extract all the text in this image, in reading order.",
    "What is the difference between these images?",
    "The image shows a bar chart with five bars of different heights and a title at the top.",
    "A book cover with a red background, the title in large white letters and the author below it.",
    "Two street scenes: a sunny road with a blue car, and the same road at night with street lights.",
    "There is a cat sitting on a wooden table next to a window; the sky outside is cloudy and grey.",
    "Text reads: Quarterly revenue grew 12 percent while costs fell by 3 percent in the last year.",
]
IMAGE_SIZE = 32
PATCH_SIZE = 8


def train_bpe(special_tokens: list[str]):
    """A byte-level BPE tokenizer (the `tokenizers` library's) trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def build_tokenizer():
    """The tiny LLaVA's tokenizer, wrapped for transformers."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor():
    """A LLaVA processor: the CLIP image processor, the tokenizer and the chat template."""
    from transformers import LlavaProcessor

    try:  # transformers >= 5.2x names the PIL backend explicitly; torchvision is not needed for it
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_model(tokenizer, seed: int):
    """A LLaVA model with random weights: 2-layer CLIP tower, 2-layer Llama decoder."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    return finish_random_model(model, tokenizer, SPECIAL_TOKENS)


def finish_random_model(model, tokenizer, special_tokens: list[str]):
    """Make a random model's greedy outputs useful, and its generation config name the tokenizer's ids."""
    import torch

    with torch.no_grad():
        # Random logits would emit control tokens (<image>, <pad>, ...) and stop after a handful of tokens;
        # silencing those rows and damping EOS gives outputs of useful length that still end on EOS sometimes.
        for token in special_tokens:
            row = tokenizer.convert_tokens_to_ids(token)
            model.lm_head.weight[row] *= 0.5 if row == tokenizer.eos_token_id else 0.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA model and its processor to `path` (idempotent: an existing build is kept)."""
    return save_once(Path(path), build_processor, lambda processor: build_model(processor.tokenizer, seed))


def save_once(path: Path, make_processor, make_model) -> Path:
    """Build and save a processor and its model, unless `path` already holds both."""
    if (path / "config.json").exists() and (path / "processor_config.json").exists():
        return path
    processor = make_processor()
    model = make_model(processor)
    path.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return path


# --- Phi-3-vision (the port in worker.models.phi3v) -----------------------------------------------------------

PHI3V_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-3-vision's own chat template (one message per turn, <|assistant|> opened by add_generation_prompt).
PHI3V_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_phi3v_tokenizer():
    """A byte-level BPE tokenizer with Phi-3's special tokens that, like Phi-3's Llama tokenizer, prepends <s>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(PHI3V_SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id("<s>")
    # The processor tokenizes every text chunk between image tags separately, so each chunk starts with <s>,
    # exactly what the real checkpoint's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=PHI3V_CHAT_TEMPLATE,
    )


def build_phi3v_model(tokenizer, seed: int):
    """A Phi3VForCausalLM with random weights: 2-layer CLIP tower (still 336 px / patch 14), 2-layer decoder."""
    import torch

    from worker.models.phi3v import Phi3VConfig, Phi3VForCausalLM

    torch.manual_seed(seed)
    hidden, heads = 64, 4
    half_head = hidden // heads // 2  # longrope has one factor per rotary frequency
    config = Phi3VConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(half_head)],
                      "long_factor": [2.0 + 0.5 * i for i in range(half_head)]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        img_processor={"image_dim_out": 32, "model_name": "openai/clip-vit-large-patch14-336",
                       "name": "clip_vision_model", "num_img_tokens": 144},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 32},
    )
    model = Phi3VForCausalLM(config).eval()
    with torch.no_grad():
        embedding = model.model.vision_embed_tokens
        # The separators start at zero in the original; random values make them matter in tests.
        embedding.glb_GN.normal_()
        embedding.sub_GN.normal_()
    return finish_random_model(model, tokenizer, PHI3V_SPECIAL_TOKENS)


def build_tiny_phi3v(path: Path, seed: int = 0) -> Path:
    """Write a tiny Phi-3-vision model and its processor to `path` (idempotent: an existing build is kept)."""
    from worker.models.phi3v import Phi3VImageProcessor, Phi3VProcessor

    return save_once(Path(path), lambda: Phi3VProcessor(Phi3VImageProcessor(num_crops=4), build_phi3v_tokenizer()),
                     lambda processor: build_phi3v_model(processor.tokenizer, seed))
