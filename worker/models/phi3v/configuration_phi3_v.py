"""Configuration for Phi-3-vision, a transformers 5.x port of the checkpoint's remote `configuration_phi3_v.py`.

`Phi3VConfig` is a `Phi3Config` (the text decoder's fields, read as-is from the checkpoint's config.json) plus the
checkpoint's two vision dicts, `embd_layer` and `img_processor`, and an optional `vision_config` for the CLIP tower.

RoPE: the checkpoint stores `rope_scaling = {"type": "su", "short_factor": [...], "long_factor": [...]}`. "su" is
what transformers now calls "longrope". `Phi3Config` (5.17 and 5.24 alike) takes `rope_scaling` as a legacy kwarg,
moves it into `rope_parameters`, renames "su"/"yarn" to "longrope" and copies the top-level
`original_max_position_embeddings` (4096) into it, keeping the factors as given. But it renames "su" after the
standard pass that adds `original_max_position_embeddings` for longrope types, so "su" dicts fail longrope
validation; this class renames "su" before that pass. A config saved by this port stores the result as
`rope_parameters` (already "longrope"), which Phi3Config reads back as is.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

# The CLIP tower the original hard-codes (openai/clip-vit-large-patch14-336); real checkpoints carry no
# vision_config, so this is what they get.
CLIP_VIT_LARGE_PATCH14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "num_channels": 3,
}
DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


def su_to_longrope(rope: dict) -> dict:
    """The checkpoint's {"type": "su", ...} as {"rope_type": "longrope", ...}; other dicts unchanged."""
    if rope.get("rope_type", rope.get("type")) != "su":
        return rope
    rope = {key: value for key, value in rope.items() if key != "type"}
    rope["rope_type"] = "longrope"
    return rope


@strict
class Phi3VConfig(Phi3Config):
    r"""
    embd_layer (`dict`, *optional*):
        The checkpoint's image-embedding settings: `embedding_cls` ("image"), `hd_transform_order` ("sub_glb"),
        `projection_cls` ("mlp"), `use_hd_transform` and `with_learnable_separator` (both true).
    img_processor (`dict`, *optional*):
        The checkpoint's vision-tower settings: `image_dim_out` (CLIP hidden size), `model_name`, `name`,
        `num_img_tokens` (144) and optionally `layer_idx` (hidden state fed to the projector, default -2) and
        `type_feature` ("patch": drop the class token).
    vision_config (`dict` or `CLIPVisionConfig`, *optional*):
        The CLIP vision tower. Absent in real checkpoints, which get CLIP ViT-L/14-336; tests pass a tiny one.
    """

    model_type = "phi3_v"
    # A plain dict works as the class attribute in 5.17 and overrides the 5.24 classproperty of the same name;
    # listing the tower here makes `attn_implementation` and dtype settings reach it.
    sub_configs = {"vision_config": CLIPVisionConfig}

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.vision_config = self._build_vision_config(self.vision_config)
        self.img_processor = self._complete_img_processor(self.img_processor)
        # The checkpoint's config.json pins "_attn_implementation": "flash_attention_2", which 5.x would honour
        # and then fail without flash-attn; the caller's `attn_implementation` (default sdpa) decides instead.
        kwargs.pop("_attn_implementation", None)
        # auto_map points at the remote code this port replaces; a saved copy must not send Auto* back to it.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs):
        # Phi3Config renames "su" to "longrope" only after the standard pass has run, and that pass adds
        # `original_max_position_embeddings` (required by longrope validation) only to longrope dicts; rename first.
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = su_to_longrope(kwargs["rope_scaling"])
        elif isinstance(self.rope_parameters, dict):
            self.rope_parameters = su_to_longrope(self.rope_parameters)
        return super().convert_rope_params_to_dict(**kwargs)

    @staticmethod
    def _build_vision_config(vision_config) -> CLIPVisionConfig:
        if isinstance(vision_config, CLIPVisionConfig):
            return vision_config
        settings = {**CLIP_VIT_LARGE_PATCH14_336, **(vision_config or {})}
        settings.pop("model_type", None)
        return CLIPVisionConfig(**settings)

    def _complete_img_processor(self, img_processor: dict | None) -> dict:
        img_processor = {**DEFAULT_IMG_PROCESSOR, **(img_processor or {})}
        if img_processor["image_dim_out"] != self.vision_config.hidden_size:
            if "image_dim_out" in (self.img_processor or {}):
                raise ValueError(
                    f"img_processor.image_dim_out={img_processor['image_dim_out']} must equal the vision tower's "
                    f"hidden_size={self.vision_config.hidden_size}"
                )
            # Only the default was there: follow the (tiny) tower given in vision_config.
            img_processor["image_dim_out"] = self.vision_config.hidden_size
        return img_processor


__all__ = ["Phi3VConfig"]
