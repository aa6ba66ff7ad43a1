"""One prompt's prefill replayed from a CUDA graph: an idle worker's lone job.

A prefill of one prompt is bound by kernel launches, not by the GPU: on the H200, one Phi-3-V prompt of 772 tokens
(one 336x336 image at num_crops=4) took 41.9 ms in `Decoder.admit` for 15.6 ms of kernels (`bench.gpu_profile
--rows 1 --parts prefill`), and a job that arrives at an idle worker waits for all of it (graphed, an idle
worker's job prefilled in 24 ms). Prefills of several prompts, or of one long prompt, are bound by compute, and run
eagerly as before.

`LonePrefill` is the language model's part (after the image features are in the embeddings) of one prompt, padded
on the left to a length bucket (a multiple of 64 tokens), with all its inputs in fixed tensors: the embeddings,
the positions, a 4-D mask (causal over the prompt's own tokens; a padding position attends to itself only, so no
row of the softmax is empty), and the pool slots that each position's key and value go to (the row's blocks for
its tokens, the trash block for the padding). On CUDA it is captured once per bucket and layout; elsewhere (the
tests on the CPU) the same `step` runs eagerly. The image tower runs eagerly before it (its own work is a few
milliseconds of kernels).

The padding changes the shapes of the matrix products, so on the GPU a lone prompt's logits may round differently
from an unpadded forward, as a prompt's do in any prefill chunk padded to a longer neighbour.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from worker import graphs
from worker.blocks import TRASH, BlockLayout
from worker.paged_attention import store

GRAPHS = 8  # buckets kept per layout (each holds its own activations' memory)
# Longer prompts prefill as chunks do: bound by compute, they gain nothing from a graph and lose to the padding and
# the masked attention (on the H200, 2,524 tokens, one image at num_crops=16: 60.5 ms graphed against 53.6 ms).
MAX_TOKENS = 1024


def embeds_of(model):
    """The function that turns input ids and images into input embeddings, for the models that have one."""
    return getattr(getattr(model, "model", None), "embed_with_images", None)


class SlotSink(DynamicCache):
    """A cache that writes every position's key and value to its slot of the pool (fixed index tensors) and hands
    them back to attention unchanged."""

    def __init__(self, layout: BlockLayout, slots: torch.Tensor):
        super().__init__()
        self.layout, self.slots = layout, slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        for states, pool in ((key_states, self.layout.keys[layer_idx]), (value_states, self.layout.values[layer_idx])):
            store(pool.view(-1, *pool.shape[2:]), self.slots, states[0].transpose(0, 1))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class LonePrefill:
    """The prefill of one prompt of at most `length` tokens into a block layout's row."""

    def __init__(self, model, layout: BlockLayout, length: int, cache_keyword: str):
        self.model, self.layout, self.length, self.cache_keyword = model, layout, length, cache_keyword
        device, dtype = layout.tokens.device, model.get_input_embeddings().weight.dtype
        hidden = model.get_input_embeddings().weight.shape[1]
        self.embeds = torch.zeros((1, length, hidden), dtype=dtype, device=device)
        self.positions = torch.zeros((1, length), dtype=torch.long, device=device)
        self.mask = torch.zeros((1, 1, length, length), dtype=torch.bool, device=device)
        self.slots = torch.zeros(length, dtype=torch.long, device=device)
        self.first = torch.zeros(1, dtype=torch.long, device=device)
        self.index = torch.arange(length, device=device)
        self.causal = self.index[:, None] >= self.index[None, :]
        self.itself = torch.eye(length, dtype=torch.bool, device=device)
        self.mask.copy_((self.causal | self.itself).view(self.mask.shape))  # no empty softmax row, even unfilled
        self.sink = SlotSink(layout, self.slots)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tried = False  # whether a capture was attempted

    def fill(self, embeds: torch.Tensor, row: int) -> None:
        """The prompt's embeddings [1, tokens, hidden] and the row whose blocks (taken already) it goes to."""
        tokens, size = embeds.shape[1], self.layout.block_size
        pad = self.length - tokens
        self.embeds[:, :pad].zero_()
        self.embeds[:, pad:].copy_(embeds)
        self.positions.copy_((self.index - pad).clamp_min(0).view(1, -1))
        real = self.index >= pad
        torch.logical_or(self.causal & real[None, :], self.itself, out=self.mask.view(self.length, self.length))
        slots = TRASH * size + torch.arange(self.length) % size
        slots[pad:] = self.layout.slots_of(row, tokens)
        self.slots.copy_(slots)

    def step(self) -> None:
        out = self.model(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_keyword: self.sink})
        self.first.copy_(out.logits[0, -1].argmax(-1, keepdim=True))

    def run(self) -> torch.Tensor:
        """The prompt's first token (a 1-element tensor of this object's: read it before the next run)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        return self.first

    def capture(self) -> None:
        """Record one prefill (worker/graphs.py; the warm-up's writes go where the next run writes again)."""
        self.graph = graphs.capture(self.step, self.model)
