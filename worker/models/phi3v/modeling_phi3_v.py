"""Phi-3-vision model, a transformers 5.x port of the checkpoint's remote `modeling_phi3_v.py` and
`image_embedding_phi3_v.py`.

The text side is transformers' own Phi-3 (`Phi3Model` / `Phi3ForCausalLM`: attention, MLP, longrope, caches, masks
and generation all come from there). What Phi-3-V adds is the `vision_embed_tokens` module, a CLIP ViT-L/14-336
tower plus the HD feature transform and a 2-layer MLP projector, whose outputs replace the token embeddings at the
positions where the processor put negative ids (-N for image N).

HD transform (kept exactly as the original): every 336x336 crop gives 24x24 patch features from CLIP layer
`layer_idx` (-2) without the class token; 2x2 neighbours are concatenated on the channel axis (12x12 tokens of
4 * 1024); the crops of one image are stitched into a (12 * h_crops) x (12 * w_crops) grid following `image_sizes`,
and `sub_GN` is appended after every grid row as a newline token; then comes the separator `glb_GN`, then the
global image treated the same way as a 1x1 grid ("sub_glb" order). The sequence goes through `img_projection`.

The CLIP tower is assembled from transformers' CLIP modules rather than `CLIPVisionModel`, whose 5.x parameter
names lack the checkpoint's `vision_model.` level (see `CLIPVisionTransformer`). Parameter names match the
checkpoint: `model.vision_embed_tokens.{img_processor.vision_model.*, glb_GN, sub_GN, img_projection.{0,2}.*}`
next to Phi-3's `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`. The original also kept the
token embedding as `vision_embed_tokens.wte` (the same module as `embed_tokens`); saving dropped that alias, so it
is not a submodule here, and a checkpoint that has it anyway loads with it ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, Phi3ForCausalLM, Phi3Model
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

from worker.models.phi3v.configuration_phi3_v import Phi3VConfig

# The original only treats ids in (-1e9, 0) as image positions; kept so the same inputs select the same positions.
MAX_INPUT_ID = int(1e9)


def image_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the image-token positions (negative ids)."""
    return (input_ids < 0) & (input_ids > -MAX_INPUT_ID)


def merge_2x2(features: torch.Tensor, h_crops: int, w_crops: int) -> torch.Tensor:
    """(n * h_crops * w_crops, H * H, C) patch features -> (n, h_crops * H/2, w_crops * H/2, 4C).

    Each 2x2 block of patches becomes one token (channels ordered row offset, column offset, C), then the crops of
    an image are laid out row-major on one grid, as the original `reshape_hd_patches_2x2merge`.
    """
    crops, length, channels = features.shape
    side = int(length**0.5)
    half = side // 2
    images = crops // (h_crops * w_crops)
    merged = features.reshape(crops, half, 2, half, 2, channels).permute(0, 1, 3, 2, 4, 5)
    merged = merged.reshape(images, h_crops, w_crops, half, half, 4 * channels).permute(0, 1, 3, 2, 4, 5)
    return merged.reshape(images, h_crops * half, w_crops * half, 4 * channels)


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision transformer built from transformers' CLIP modules, under the checkpoint's names.

    transformers 5.x flattened `CLIPVisionModel` (no `vision_model.` level; a load-time key rename covers old
    checkpoints, and in 5.24 a reverse rename on save), so its parameter names are not the checkpoint's. This keeps
    the 4.x layout, `vision_model.{embeddings, pre_layrnorm, encoder, post_layernorm}`, with CLIP's own layers.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        # Unused by Phi-3-V (it reads an inner layer), but part of the checkpoint.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_state(self, pixel_values: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """`CLIPVisionModel(...).hidden_states[layer_idx]`, running only the layers that entry needs."""
        # hidden_states = (embeddings after pre_layrnorm, layer 1 output, ..., layer N output)
        stop = range(len(self.encoder.layers) + 1)[layer_idx]
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:stop]:
            hidden = layer(hidden, attention_mask=None)
        return hidden


class CLIPVisionTower(nn.Module):
    """The `img_processor` level of the checkpoint, holding `vision_model` as 4.x `CLIPVisionModel` did."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config)


class Phi3VImageEmbedding(nn.Module):
    """CLIP tower, HD transform and projector: pixel values -> one embedding per image token."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        check_supported(config)
        dim = config.img_processor["image_dim_out"]
        self.image_dim_out = dim
        self.crop_size = config.vision_config.image_size
        self.layer_idx = config.img_processor.get("layer_idx", -2)
        self.img_processor = CLIPVisionTower(config.vision_config)
        # Shapes as in the checkpoint: separator (1, 1, 4C) and row newline (1, 1, 1, 4C).
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * dim))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
        """(num_images, 1 + crops, 3, 336, 336) and [[h, w], ...] -> (total image tokens, hidden_size)."""
        num_images, num_crops = pixel_values.shape[:2]
        features = self.patch_features(pixel_values.flatten(0, 1))
        features = features.reshape(num_images, num_crops, -1, self.image_dim_out)
        tokens = self.hd_feature_transform(features, image_sizes)
        projection = self.img_projection[0]
        return self.img_projection(tokens.to(device=projection.weight.device, dtype=projection.weight.dtype))

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden state `layer_idx` of the tower, class token dropped ("patch" features)."""
        tower = self.img_processor.vision_model
        pixel_values = pixel_values.to(tower.embeddings.patch_embedding.weight.dtype)
        return tower.hidden_state(pixel_values, self.layer_idx)[:, 1:]

    def hd_feature_transform(self, features: torch.Tensor, image_sizes) -> torch.Tensor:
        """Per image: sub-image grid with newlines, separator, global image with newlines ("sub_glb").

        (num_images, 1 + crops, 576, C) -> (total image tokens, 4C), before the projection.
        """
        global_tokens = self.add_newlines(merge_2x2(features[:, 0], 1, 1))
        pieces = []
        for index, (height, width) in enumerate(torch.as_tensor(image_sizes).tolist()):
            h_crops, w_crops = int(height) // self.crop_size, int(width) // self.crop_size
            # Crops beyond h_crops * w_crops are the processor's zero padding.
            crops = features[index, 1 : 1 + h_crops * w_crops]
            pieces += [self.add_newlines(merge_2x2(crops, h_crops, w_crops))[0], self.glb_GN[0], global_tokens[index]]
        return torch.cat(pieces, dim=0)

    def add_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """(n, rows, cols, 4C) -> (n, rows * (cols + 1), 4C): `sub_GN` closes every row."""
        images, rows, _, channels = grid.shape
        newlines = self.sub_GN.expand(images, rows, -1, -1)
        return torch.cat([grid, newlines], dim=2).reshape(images, -1, channels)


def check_supported(config: Phi3VConfig) -> None:
    """The original's forward only works with the HD transform, learnable separators, an MLP and "sub_glb"."""
    layer = config.embd_layer
    wanted = {"use_hd_transform": True, "with_learnable_separator": True, "projection_cls": "mlp",
              "hd_transform_order": "sub_glb"}
    unsupported = {key: layer.get(key) for key, value in wanted.items() if layer.get(key) != value}
    if unsupported or config.img_processor.get("type_feature", "patch") != "patch":
        raise NotImplementedError(f"Phi-3-V embedding settings not supported: {unsupported or config.img_processor}")


def init_vision_weights(module: nn.Module, std: float) -> bool:
    """Initialise what Phi3PreTrainedModel._init_weights does not know; True if `module` was handled.

    `init.*` skip tensors loaded from a checkpoint, so this only touches missing weights (and rebuilds the
    non-persistent `position_ids` buffer that meta-device loading leaves empty).
    """
    if isinstance(module, CLIPVisionEmbeddings):
        init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
        init.normal_(module.patch_embedding.weight, mean=0.0, std=std)
        init.normal_(module.position_embedding.weight, mean=0.0, std=std)
        init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        return True
    if isinstance(module, Phi3VImageEmbedding):
        # Zeros, as the original creates them (its _init_weights never touched them).
        init.zeros_(module.glb_GN)
        init.zeros_(module.sub_GN)
        return True
    return False


class Phi3VModel(Phi3Model):
    """Phi-3 decoder whose input embeddings carry image features at the negative-id positions."""

    config_class = Phi3VConfig

    def _init_weights(self, module):
        if not init_vision_weights(module, self.config.initializer_range):
            super()._init_weights(module)

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        if config.vision_config._attn_implementation is None:
            # A PreTrainedModel tower would resolve its own attention backend at init; this plain-module tower
            # takes the decoder's (from_pretrained's `attn_implementation` reaches both through the config).
            config.vision_config._attn_implementation_internal = config._attn_implementation
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        # Again, now that the vision module exists (Phi3Model.__init__ ran it before).
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, pixel_values=None, image_sizes=None, **kwargs):
        # Everything else (mask, positions, cache under either of its 5.x names) goes to Phi-3 untouched.
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_with_images(input_ids, pixel_values, image_sizes)
        return super().forward(input_ids=None, inputs_embeds=inputs_embeds, **kwargs)

    def embed_with_images(self, input_ids, pixel_values=None, image_sizes=None) -> torch.Tensor:
        positions = image_positions(input_ids)
        # Negative ids would index out of range; the original clamped them (in place) before the lookup too.
        embeds = self.embed_tokens(input_ids.clamp_min(0))
        if not positions.any():
            return embeds
        if pixel_values is None or image_sizes is None:
            raise ValueError("input_ids hold image positions (negative ids) but pixel_values/image_sizes are missing")
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != int(positions.sum()):
            raise ValueError(f"{int(positions.sum())} image positions in input_ids but the images give "
                             f"{features.shape[0]} tokens; were input_ids and pixel_values made together?")
        embeds = embeds.index_put(positions.nonzero(as_tuple=True), features.to(embeds.dtype))
        return nn.functional.dropout(embeds, p=self.config.embd_pdrop, training=self.training)


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3-V with the LM head; forward, loss and generation are Phi3ForCausalLM's."""

    config_class = Phi3VConfig
    input_modalities = ("image", "text")
    # See the module docstring: the original's alias of embed_tokens, absent from the checkpoint we know of.
    _keys_to_ignore_on_load_unexpected = [r"vision_embed_tokens\.wte\.weight"]

    def _init_weights(self, module):
        if not init_vision_weights(module, self.config.initializer_range):
            super()._init_weights(module)

    def __init__(self, config: Phi3VConfig):
        # Phi3ForCausalLM.__init__ would first build a text-only Phi3Model; set up the same attributes directly.
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, pixel_values=None, image_sizes=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, pixel_values=pixel_values, image_sizes=image_sizes, **kwargs
        )
        # Generation drops pixel values after prefill. When the prompt runs again (Phi-3 discards the cache on
        # crossing the long-RoPE threshold), its image positions need them again.
        step_ids = inputs.get("input_ids")
        if pixel_values is not None and step_ids is not None and image_positions(step_ids).any():
            inputs["pixel_values"], inputs["image_sizes"] = pixel_values, image_sizes
        return inputs


__all__ = ["CLIPVisionTower", "CLIPVisionTransformer", "Phi3VForCausalLM", "Phi3VImageEmbedding", "Phi3VModel"]
