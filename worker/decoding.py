"""Greedy decoding of many prompts at once: a batched prefill, then a decode loop over a preallocated KV cache.

The decode step has fixed shapes and keeps all of its state in tensors (the next token, each row's position, the
write slot, the attention mask), so on CUDA it is captured once per (rows, length) bucket in a CUDA graph and
replayed: an eager Phi-3 step is bound by kernel launches (~45 ms), a replay is not. On the CPU the same step runs
eagerly, so the tests exercise everything but the capture.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from worker.rope import LONG_ROPE_TYPES, long_rope_modules, per_row_rope

log = logging.getLogger(__name__)

LENGTH_STEP = 64  # cache lengths are rounded up to this, so that nearby prompt lengths share one graph
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SYNC_EVERY = 8  # decode steps between looks at the produced tokens (end of sequence, cancellation)
MAX_SLOTS = 16  # decode graphs kept, least recently used out: each holds a few MB besides its view of the arena


def _cache_keyword() -> str:
    """transformers 5.x renames the forward's `past_key_values` to `cache`; pass whichever this version takes."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KW = _cache_keyword()


@dataclass
class Prompt:
    """One job's processor output (batch of one, on the CPU) and how many tokens it may generate."""

    inputs: dict[str, torch.Tensor]
    max_new_tokens: int

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass
class Completion:
    """What one row produced: its new tokens, up to and including an end-of-sequence token."""

    tokens: list[int]
    prompt_tokens: int
    canceled: bool = False


@dataclass
class BatchStats:
    rows: int
    cache_rows: int
    cache_length: int
    graphed: bool
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    idle_s: float = 0.0  # the GPU thread's wait for this batch's first ticket


@dataclass(frozen=True)
class KVShape:
    """The keys and values a model caches per token: `layers` pairs of [heads, head_dim], from its text config."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> KVShape:
        config = model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, heads, head_dim, next(model.parameters()).dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.itemsize


# more(room, prompt_length, length): prompts waiting now (at most `room`) that fit a batch padded to prompt_length
# with caches of `length`; the batcher's, for prompts that join a batch while it prefills.
Joiner = Callable[[int, int, int], list[Prompt]]


class StaticKV:
    """A preallocated KV cache, one [rows, heads, length, head_dim] pair per layer, laid out in `arena`.

    It quacks like transformers' Cache for a decode step: attention layers call `update`, which writes the new
    token's keys and values at `position` (a device tensor, so a captured graph advances it) and returns the
    whole buffers; the 4-D attention mask we pass hides the slots that are padding or not written yet.
    """

    def __init__(self, shape: KVShape, rows: int, length: int, arena: torch.Tensor):
        # Each layer's keys (and values) get the same share of the arena whatever `rows` is, so that caches of
        # one length but different row counts view the same memory row by row: a prefill into many rows can
        # decode in a slot of fewer.
        row = shape.heads * length * shape.head_dim
        stride = arena.numel() // (2 * shape.layers * row) * row
        if rows * row > stride:
            raise ValueError(f"a KV cache of {rows} x {length} does not fit the arena")
        views = [arena[i * stride:i * stride + rows * row].view(rows, shape.heads, length, shape.head_dim)
                 for i in range(2 * shape.layers)]
        self.keys, self.values = views[:shape.layers], views[shape.layers:]
        self.position = torch.zeros((), dtype=torch.long, device=arena.device)
        self.rows, self.length = rows, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        slot = self.position.view(1)
        self.keys[layer_idx].index_copy_(2, slot, key_states)
        self.values[layer_idx].index_copy_(2, slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        return self.position

    def prefill_sink(self, first_row: int) -> DynamicCache:
        """A cache for one prefill chunk (rows first_row..) that writes each layer's keys and values straight into
        these buffers, at slots 0..L-1, and hands them back to attention unchanged: what a fresh DynamicCache would
        return, without its copy and ours. transformers sizes the prefill's mask from the (empty) cache first."""
        cache = DynamicCache()

        def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
            rows, length = key_states.shape[0], key_states.shape[2]
            self.keys[layer_idx][first_row:first_row + rows, :, :length].copy_(key_states)
            self.values[layer_idx][first_row:first_row + rows, :, :length].copy_(value_states)
            return key_states, value_states

        cache.update = update
        return cache


class DecodeSlot:
    """The buffers of one (rows, length) bucket and its decode step, captured in a CUDA graph when possible."""

    def __init__(self, model, kv: StaticKV, steps: int):
        self.model, self.kv = model, kv
        self.embed = model.get_input_embeddings()
        device = kv.position.device
        self.tokens = torch.zeros((kv.rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((kv.rows, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((kv.rows, 1, 1, kv.length), dtype=torch.bool, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.history = torch.zeros((kv.rows, steps), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        # Eager attention adds its mask to the scores: it needs 0 / -inf, not the boolean mask SDPA takes.
        self.additive = model.config._attn_implementation == "eager"

    def attention_mask(self) -> torch.Tensor:
        if not self.additive:
            return self.mask
        return torch.zeros(self.mask.shape, dtype=self.kv.keys[0].dtype, device=self.mask.device).masked_fill_(
            ~self.mask, torch.finfo(self.kv.keys[0].dtype).min)

    def step(self) -> None:
        """One decode step for every row, all state in place: the graph replays exactly this."""
        self.mask.index_fill_(3, self.kv.position.view(1), True)
        out = self.model(inputs_embeds=self.embed(self.tokens), attention_mask=self.attention_mask(),
                         position_ids=self.positions, use_cache=True, logits_to_keep=1, **{CACHE_KW: self.kv})
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens.copy_(next_tokens)
        self.step_index.add_(1)
        self.history.index_copy_(1, self.step_index.view(1), next_tokens)
        self.kv.position.add_(1)
        self.positions.add_(1)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def capture(self) -> None:
        """Warm up on a side stream, then record one step. The state it scribbles on is reset per batch; the keys
        and values it writes go to the last column, which no prompt fills (a job makes at least one token) and a
        decode writes before reading: a slot can be captured after a prefill into the same memory."""
        self.mask[:, :, :, 0] = True
        last = self.kv.length - 1
        with _static_rope(self.model):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.kv.position.fill_(last)
                    self.step()
                self.kv.position.fill_(last)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # A private memory pool per graph: graphs come and go with their slots, and a pool shared with a
            # freed graph cannot be captured into again.
            with torch.cuda.graph(graph):
                self.step()
        self.graph = graph

    def reset(self, prompt_length: int) -> None:
        self.kv.position.fill_(prompt_length)
        self.step_index.zero_()
        self.mask.zero_()
        self.mask[:, :, :, 0] = True  # rows that are padding attend to something, so no row is all -inf
        self.tokens.zero_()
        self.positions.zero_()


class _static_rope:
    """Within the block, rotary embeddings skip transformers' dynamic frequency update (long-RoPE, dynamic NTK):
    it compares a tensor in Python, which a CUDA graph cannot capture. Graphs are only used for lengths where the
    frequencies the update would pick cannot change (see `Decoder.graphable`)."""

    def __init__(self, model):
        per_row = set(map(id, long_rope_modules(model)))  # these have a capturable forward (worker/rope.py)
        self.modules = [m for m in model.modules() if hasattr(type(m).forward, "__wrapped__")
                        and "rotary" in type(m).__name__.lower() and id(m) not in per_row]

    def __enter__(self):
        for module in self.modules:
            # Under both decorators (no_grad, dynamic_rope_update); the decode runs in inference mode anyway.
            module.forward = types.MethodType(inspect.unwrap(type(module).forward), module)

    def __exit__(self, *_exc):
        for module in self.modules:
            del module.forward


def row_bucket(rows: int) -> int:
    return next((bucket for bucket in ROW_BUCKETS if bucket >= rows), rows)


def length_bucket(length: int) -> int:
    return -(-length // LENGTH_STEP) * LENGTH_STEP


class Decoder:
    """Runs batches of prompts through one model: prefill in chunks, then the decode loop on a cached slot."""

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, *, use_graphs: bool, kv_budget_bytes: int,
                 prefill_tokens: int = 16384):
        self.model, self.pad_id = model, pad_id
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_tokens = prefill_tokens
        self.slots: OrderedDict[tuple[int, int], DecodeSlot] = OrderedDict()
        self.arena: torch.Tensor | None = None
        self.kv_shape = KVShape.of(model)

    def max_rows(self, length: int) -> int:
        """How many rows of this total length fit in the KV budget."""
        return max(1, self.kv_budget_bytes // (self.kv_shape.bytes_per_token * length_bucket(length)))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], on_done: Callable[[int, Completion], None],
                 canceled: Callable[[], set[int]] = lambda: set(), more: Joiner | None = None,
                 max_rows: int = 0) -> BatchStats:
        """Greedy-decode every prompt; `on_done(i, completion)` fires as each row ends (the rest go on).

        With `more`, prompts that arrive while the batch is prefilling join it (up to `max_rows` rows and what fits
        the cache of the first ones): a burst makes one full batch without the GPU waiting for it to gather.
        """
        with per_row_rope(self.model):
            return self._generate(list(prompts), on_done, canceled, more, max_rows)

    def _generate(self, prompts: list[Prompt], on_done, canceled, more, max_rows) -> BatchStats:
        prompt_length = max(p.length for p in prompts)
        length = length_bucket(prompt_length + max(p.max_new_tokens for p in prompts))
        capacity = min(self.max_rows(length), max_rows) if more else len(prompts)
        started = time.perf_counter()
        slot = self._prefill(prompts, prompt_length, length, capacity, more)
        stats = BatchStats(len(prompts), slot.kv.rows, length, slot.graph is not None,
                           prefill_s=time.perf_counter() - started)
        stats.steps = self._decode(slot, prompts, on_done, canceled)
        stats.decode_s = time.perf_counter() - started - stats.prefill_s
        return stats

    def _prefill(self, prompts: list[Prompt], prompt_length: int, length: int, capacity: int,
                 more: Joiner | None) -> DecodeSlot:
        """Prefill chunk by chunk into the arena's rows, taking in joiners between chunks; then the decode slot
        for the rows there are."""
        rows_capacity = max(len(prompts), min(row_bucket(capacity), self.max_rows(length)))
        kv = StaticKV(self.kv_shape, rows_capacity, length, self._arena(rows_capacity, length))
        masks, firsts = [], []
        start = 0
        while start < len(prompts):
            chunk = prompts[start:start + self._chunk_rows(prompt_length)]
            inputs = collate([p.inputs for p in chunk], prompt_length, self.pad_id)
            inputs = {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None)
                      for k, v in inputs.items()}
            mask = inputs["attention_mask"]
            out = self.model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                             logits_to_keep=1, **{CACHE_KW: kv.prefill_sink(start)})
            masks.append(mask.bool())
            firsts.append(out.logits[:, -1].argmax(-1))
            del out
            start += len(chunk)
            if more and len(prompts) < capacity:
                prompts += more(capacity - len(prompts), prompt_length, length)
        slot = self._slot(len(prompts), length)
        slot.reset(prompt_length)
        rows = slice(0, len(prompts))
        slot.mask[rows, 0, 0, :prompt_length] = torch.cat(masks)
        slot.positions[rows, 0] = slot.mask[rows, 0, 0, :prompt_length].sum(-1)
        slot.tokens[rows, 0] = slot.history[rows, 0] = torch.cat(firsts)
        return slot

    def _chunk_rows(self, prompt_length: int) -> int:
        """Rows per prefill forward: at most `prefill_tokens` padded tokens, which bounds its activations."""
        return max(1, self.prefill_tokens // prompt_length)

    def _decode(self, slot: DecodeSlot, prompts, on_done, canceled) -> int:
        eos = self.eos_ids.to(self.device)
        open_rows = set(range(len(prompts)))
        limit = max(p.max_new_tokens for p in prompts)
        produced = 1  # the prefill gave each row its first token
        while True:
            if produced % SYNC_EVERY == 0 or produced >= limit:
                self._settle(slot, prompts, produced, open_rows, eos, on_done, canceled())
            if not open_rows or produced >= limit:
                return produced - 1
            slot.run()
            produced += 1

    def _settle(self, slot, prompts, produced: int, open_rows: set[int], eos, on_done, canceled: set[int]) -> None:
        """Hand back every row that has ended: end-of-sequence, its own max_new_tokens, or canceled."""
        history = slot.history[:len(prompts), :produced]
        hits = torch.isin(history, eos) if eos.numel() else torch.zeros_like(history, dtype=torch.bool)
        first_eos = torch.where(hits.any(-1), hits.int().argmax(-1), produced).tolist()
        history = history.tolist()
        for row in sorted(open_rows):
            ends = min(first_eos[row] + 1, prompts[row].max_new_tokens)
            if row in canceled or ends <= produced:
                open_rows.discard(row)
                on_done(row, Completion(history[row][:ends], prompts[row].length, canceled=row in canceled))

    def _slot(self, rows: int, length: int) -> DecodeSlot:
        # Never more rows than the arena holds at this length (the batcher keeps batches within max_rows).
        key = (min(row_bucket(rows), self.max_rows(length)), length)
        if rows > key[0]:
            raise ValueError(f"{rows} rows of {length} tokens do not fit the KV budget")
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        slot = DecodeSlot(self.model, StaticKV(self.kv_shape, *key, self._arena(*key)), length)
        if self.use_graphs and self.graphable(length):
            try:
                slot.capture()
            except RuntimeError:
                log.exception("could not capture the decode step of %s in a CUDA graph; it runs eagerly", key)
                slot.graph = None
        self.slots[key] = slot
        while len(self.slots) > MAX_SLOTS:
            self.slots.popitem(last=False)
        return slot

    def _arena(self, rows: int, length: int) -> torch.Tensor:
        """The memory that slots view: on CUDA the whole KV budget as one buffer, allocated at the first batch (one
        batch decodes at a time, so changing buckets allocates nothing and nothing fragments); on the CPU, where
        nothing is captured, only as much as the largest slot so far. Zeroed: slots that a mask hides must hold
        finite numbers (0 x NaN would reach the output)."""
        elements = rows * length * self.kv_shape.bytes_per_token // self.dtype.itemsize
        if self.arena is None or self.arena.numel() < elements:
            if self.device.type == "cuda":
                elements = max(elements, self.kv_budget_bytes // self.dtype.itemsize)
            self.slots.clear()  # views of the old arena
            self.arena = None
            self.arena = torch.zeros(elements, dtype=self.dtype, device=self.device)
        return self.arena

    def out_of_memory(self, rows: int) -> None:
        """A batch of `rows` did not fit: give back the arena and the graphs, with a smaller KV budget."""
        self.slots.clear()
        self.arena = None
        self.kv_budget_bytes = int(self.kv_budget_bytes * 0.8)
        log.warning("out of GPU memory with %d rows; KV budget lowered to %.1f GiB", rows, self.kv_budget_bytes / 2**30)
        gc.collect()  # cycles that still hold tensors of the failed batch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def graphable(self, length: int) -> bool:
        """Long-RoPE picks its frequencies from the longest position: a graph fixes them, so its lengths must stay
        on the side of the threshold that the prefill chose (we keep graphs to the short side)."""
        config = self.model.config.get_text_config()
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") in ("default", "linear", "llama3", *LONG_ROPE_TYPES):
            return True  # long-RoPE chooses per row without a Python branch (worker/rope.py)
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        return length <= original


def collate(inputs: Sequence[dict[str, torch.Tensor]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the token-aligned tensors of single prompts to `length` and concatenate the rest (images)."""
    batch: dict[str, torch.Tensor] = {}
    for key in inputs[0]:
        parts = [one[key] for one in inputs]
        if key in ("input_ids", "attention_mask"):
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([_left_pad(part, length, fill) for part in parts])
        else:
            batch[key] = torch.cat(_pad_to_same(parts))
    return batch


def _left_pad(part: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    pad = length - part.shape[1]
    return torch.cat([part.new_full((part.shape[0], pad), fill), part], dim=1) if pad else part


def _pad_to_same(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad every dimension but the first to the largest (Phi-3-V's crop counts, for one)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for part in parts:
        padding = []
        for d in reversed(range(1, part.dim())):
            padding += [0, shape[d - 1] - part.shape[d]]
        out.append(torch.nn.functional.pad(part, padding) if any(padding) else part)
    return out


