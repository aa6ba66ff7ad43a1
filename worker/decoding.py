"""Greedy decoding with iteration-level scheduling: rows join and leave a running batch at every decode step.

The KV cache is one arena cut into rows of `length` tokens each (a layout fixed while rows run). A prompt joins by
a prefill into free rows, between decode steps (see `Decoder.admit`); every decode step then advances each row
by one token at its own write slot and position, and a row that has ended (end-of-sequence, its max_new_tokens,
canceled) is handed back and its row is free for the next prompt at once. Nothing waits for a batch's longest row.

The decode step has fixed shapes and keeps all of its state in tensors (each row's next token, position, write
slot and attention mask), so on CUDA it is captured once per row-count bucket in a CUDA graph and replayed: an
eager Phi-3 step is bound by kernel launches (~45 ms), a replay is not. Only the occupied prefix of the rows (up to
the bucket of the highest occupied row) is run. On the CPU the same step runs eagerly, so the tests exercise
everything but the capture.

With `kv_blocks` (VISIONQ_KV_BLOCKS) the cache is one pool of blocks instead (worker/blocks.py): a row holds only
its own tokens, a prompt joins when its row's blocks are free (`fits`), and the decode step attends through each
row's block table (`BlockDecodeStep`, worker/paged_attention.py). The layout's `length` then bounds one row only.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from worker import graphs
from worker import lone_prefill as lone_prefill_module
from worker.blocks import BLOCK_SIZE, BlockLayout, blocks_for
from worker.paged_attention import blocks_attention
from worker.rope import LONG_ROPE_TYPES, long_rope_modules, original_max_positions, per_row_rope

log = logging.getLogger(__name__)

LENGTH_STEP = 64  # row lengths are rounded up to this, so that nearby needs share one layout (and its graphs)
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


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

    @property
    def need(self) -> int:
        """Cache slots its row needs: the prompt and every new token (the last one is never fed, one spare)."""
        return self.length + self.max_new_tokens


@dataclass
class Completion:
    """What one row produced: its new tokens, up to and including an end-of-sequence token."""

    tokens: list[int]
    prompt_tokens: int
    canceled: bool = False


@dataclass
class BatchStats:
    """One run of the GPU thread, from idle to idle (rows join and leave it all along)."""

    rows: int  # jobs admitted during the run
    cache_rows: int  # rows of the layout
    cache_length: int  # tokens per row of the layout
    graphed: bool
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    idle_s: float = 0.0  # the GPU thread's wait for the run's first ticket
    peak_rows: int = 0  # most rows decoding at once


@dataclass(frozen=True)
class KVShape:
    """The keys and values a model caches per token: `layers` pairs of [heads, head_dim], from its text config."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model, dtype: torch.dtype | None = None) -> KVShape:
        """The model's cache shape, in `dtype` (None: the model's own)."""
        config = model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, heads, head_dim, dtype or next(model.parameters()).dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.itemsize


@dataclass
class Row:
    """A job's row: what it was admitted with and what it has produced since."""

    tag: object  # the caller's handle (the batcher's ticket)
    prompt: Prompt  # as prefilled (after a long-RoPE recompute: the prompt and the tokens before it)
    prompt_tokens: int  # the job's own prompt length
    tokens: list[int] = field(default_factory=list)  # produced since this prefill
    carried: list[int] = field(default_factory=list)  # produced before a recompute
    short: bool = True  # prefilled with long-RoPE's short factors (at or under its threshold)

    def completion(self, canceled: bool = False) -> Completion:
        return Completion(self.carried + self.tokens, self.prompt_tokens, canceled)


class RowKV:
    """The cache of the first `rows` rows, one [rows, heads, length, head_dim] pair per layer viewing the arena.

    It quacks like transformers' Cache for a decode step: attention layers call `update`, which writes each row's
    new keys and values at that row's own write slot (a device tensor, so a captured graph advances it) and returns
    the whole buffers; the 4-D attention mask we pass hides the slots that are padding or not written yet.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write: torch.Tensor):
        self.keys, self.values, self.write = keys, values, write

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        rows, heads, _, head_dim = key_states.shape
        slots = self.write.view(rows, 1, 1, 1).expand(rows, heads, 1, head_dim)
        self.keys[layer_idx].scatter_(2, slots, key_states)
        self.values[layer_idx].scatter_(2, slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed; transformers only asks for the mask it is given anyway


class Layout:
    """The arena cut into `rows` rows of `length` tokens, and the decode state of every row (device tensors)."""

    def __init__(self, shape: KVShape, rows: int, length: int, arena: torch.Tensor):
        row = shape.heads * length * shape.head_dim
        stride = arena.numel() // (2 * shape.layers * row) * row
        if rows * row > stride or rows < 1:
            raise ValueError(f"a KV cache of {rows} x {length} does not fit the arena")
        views = [arena[i * stride:i * stride + rows * row].view(rows, shape.heads, length, shape.head_dim)
                 for i in range(2 * shape.layers)]
        self.keys, self.values = views[:shape.layers], views[shape.layers:]
        self.rows, self.length = rows, length
        device = arena.device
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.write = torch.full((rows,), length - 1, dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, 1, 1, length), dtype=torch.bool, device=device)
        self.mask[:, :, :, 0] = True  # free rows attend to something, so no row is all -inf

    def view(self, rows: int) -> RowKV:
        return RowKV([k[:rows] for k in self.keys], [v[:rows] for v in self.values], self.write[:rows])

    def free(self, rows: list[int]) -> None:
        """Reset freed rows' state: their stale keys stay (finite), hidden by the mask."""
        index = torch.tensor(rows, device=self.tokens.device)
        self.mask.index_fill_(0, index, False)
        self.mask[index, :, :, 0] = True
        self.write.index_fill_(0, index, self.length - 1)
        self.positions.index_fill_(0, index, 0)
        self.tokens.index_fill_(0, index, 0)

    def prefill_sink(self, rows: torch.Tensor) -> DynamicCache:
        """A cache for one prefill chunk that writes each layer's keys and values straight into the given rows, at
        slots 0..L-1, and hands them back to attention unchanged: what a fresh DynamicCache would return, without
        its copy and ours. transformers sizes the prefill's mask from the (empty) cache first."""
        cache = DynamicCache()

        def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
            length = key_states.shape[2]
            self.keys[layer_idx][:, :, :length].index_copy_(0, rows, key_states)
            self.values[layer_idx][:, :, :length].index_copy_(0, rows, value_states)
            return key_states, value_states

        cache.update = update
        return cache


class DecodeStep:
    """The decode step of the first `rows` rows of a layout, captured in a CUDA graph when possible."""

    def __init__(self, model, layout: Layout, rows: int):
        self.model, self.rows = model, rows
        self.embed = model.get_input_embeddings()
        self.kv = layout.view(rows)
        self.tokens, self.positions = layout.tokens[:rows], layout.positions[:rows]
        self.write, self.mask = layout.write[:rows], layout.mask[:rows]
        self.limit = layout.length - 1
        # Eager attention adds its mask to the scores: it needs 0 / -inf, not the boolean mask SDPA takes.
        self.additive = model.config._attn_implementation == "eager"
        self.dtype = layout.keys[0].dtype
        self.graph: torch.cuda.CUDAGraph | None = None

    def attention_mask(self) -> torch.Tensor:
        if not self.additive:
            return self.mask
        return torch.zeros(self.mask.shape, dtype=self.dtype, device=self.mask.device).masked_fill_(
            ~self.mask, torch.finfo(self.dtype).min)

    def step(self) -> None:
        """One decode step for every row, all state in place: the graph replays exactly this."""
        self.mask.scatter_(3, self.write.view(-1, 1, 1, 1), True)
        out = self.model(inputs_embeds=self.embed(self.tokens), attention_mask=self.attention_mask(),
                         position_ids=self.positions, use_cache=True, logits_to_keep=1, **{CACHE_KW: self.kv})
        self.tokens.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        # A free row writes its last slot over and over; a live row never gets there (its need fits the length).
        self.write.add_(1).clamp_(max=self.limit)
        self.positions.add_(1)

    def state(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step changes (a capture puts them back)."""
        return self.tokens, self.positions, self.write, self.mask

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def capture(self) -> None:
        """Warm up on a side stream, then record one step. Rows may be decoding: their state is put back after, and
        the keys and values the warm-up wrote land in slots their mask hides, which the next step writes again
        before it reads them."""
        saved = [t.clone() for t in self.state()]
        try:
            self.graph = graphs.capture(self.step, self.model)
        finally:  # also when the capture fails after its warm-up: the rows then go on eagerly from where they were
            for tensor, value in zip(self.state(), saved, strict=True):
                tensor.copy_(value)


class BlockDecodeStep(DecodeStep):
    """The decode step over a block layout: each row writes its new key and value at the slot its length and block
    table give, and attention reads each row's own tokens only (worker/paged_attention.py). Fixed shapes and all
    state in tensors, as `DecodeStep`: captured once per row-count bucket."""

    def __init__(self, model, layout: BlockLayout, rows: int):
        self.model, self.rows, self.layout = model, rows, layout
        self.embed = model.get_input_embeddings()
        self.kv = layout.view(rows)
        self.tokens, self.positions = layout.tokens[:rows], layout.positions[:rows]
        self.lengths, self.live, self.table = layout.lengths[:rows], layout.live[:rows], layout.table[:rows]
        self.slots, self.seen = layout.slots[:rows], layout.seen[:rows]
        # transformers takes a 4-D mask as it is given; block attention ignores it (the lengths mask the rows).
        self.mask = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=layout.tokens.device)
        self.attention = blocks_attention(model, self.table, self.seen)
        self.graph = None

    def state(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.positions, self.lengths, self.slots, self.seen

    def step(self) -> None:
        size = self.layout.block_size
        block = self.table.gather(1, (self.lengths // size).view(-1, 1)).view(-1)
        self.slots.copy_(block.long() * size + self.lengths % size)
        self.seen.copy_(self.lengths + 1)
        with self.attention:
            out = self.model(inputs_embeds=self.embed(self.tokens), attention_mask=self.mask,
                             position_ids=self.positions, use_cache=True, logits_to_keep=1, **{CACHE_KW: self.kv})
        self.tokens.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        # Free rows stay at length 0 (they write the trash block's first slot, and attend to it alone).
        self.lengths.add_(self.live)
        self.positions.add_(self.live.view(-1, 1))


def _capture(graphed: DecodeStep | lone_prefill_module.LonePrefill, what: str) -> None:
    """Capture `graphed` in its CUDA graph; one that cannot be captured runs eagerly (and says so)."""
    try:
        graphed.capture()
    except RuntimeError:
        log.exception("could not capture %s in a CUDA graph; it runs eagerly", what)
        graphed.graph = None


def row_bucket(rows: int) -> int:
    return next((bucket for bucket in ROW_BUCKETS if bucket >= rows), rows)


def length_bucket(length: int) -> int:
    return -(-length // LENGTH_STEP) * LENGTH_STEP


class Decoder:
    """Rows of one model's KV arena: prompts join by prefill (`admit`), every `step` decodes them all one token
    and hands back the rows that ended. Everything runs on the caller's one thread (the GPU thread)."""

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, *, use_graphs: bool, kv_budget_bytes: int,
                 prefill_tokens: int = 16384, kv_blocks: bool = False, lone_prefill: bool | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.model, self.pad_id = model, pad_id
        self.eos_ids = frozenset(eos_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_tokens = prefill_tokens
        # Keys and values in the model's dtype, or `kv_dtype` (fp8: half the bytes a decode step reads; its outputs
        # are no longer exactly the model's): only with blocks, whose kernels convert.
        if kv_dtype not in (None, self.dtype) and not kv_blocks:
            raise ValueError(f"a {kv_dtype} KV cache needs the KV cache by blocks")
        self.kv_shape = KVShape.of(model, kv_dtype)
        # The KV cache by blocks (worker/blocks.py): rows hold their own tokens only; else rows of one length.
        self.blocks = kv_blocks
        self.arena: torch.Tensor | None = None
        self.layout: Layout | BlockLayout | None = None
        self.steps: dict[int, DecodeStep] = {}  # of the current layout, by rows
        # One prompt alone prefills through worker/lone_prefill.py (None: where it is graphed, with graphs on CUDA;
        # True: also eagerly, as the CPU tests run it): with blocks, SDPA and a model that embeds its own images.
        self.lone_prefill = (self.use_graphs if lone_prefill is None else lone_prefill) and kv_blocks and \
            lone_prefill_module.embeds_of(model) is not None and model.config._attn_implementation == "sdpa"
        self.lones: dict[int, lone_prefill_module.LonePrefill] = {}  # of the current layout, by padded length
        self.rows: list[Row | None] = []
        self.rope = per_row_rope(model)
        long_rope = long_rope_modules(model)
        self.long_rope_at = original_max_positions(long_rope[0]) if long_rope else None

    # --- capacity -----------------------------------------------------------------------------------------------

    def max_rows(self, length: int) -> int:
        """How many rows of this length fit in the KV budget."""
        return max(1, self.kv_budget_bytes // (self.kv_shape.bytes_per_token * length_bucket(length)))

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    def free_rows(self) -> int:
        return len(self.rows) - self.running

    def fits(self, prompt: Prompt, joining: Sequence[Prompt] = ()) -> bool:
        """Whether the current layout's rows are long enough for the prompt (a free row is another matter); with
        blocks, also whether its blocks are free now, beside those of the prompts `joining` with it."""
        if self.layout is None or prompt.need > self.layout.length:
            return False
        if not self.blocks:
            return True
        return self.layout.fits(prompt.need, sum(blocks_for(p.need, self.layout.block_size) for p in joining))

    @torch.inference_mode()
    def plan(self, need: int, max_rows: int) -> None:
        """A layout for rows of `need` tokens, at most `max_rows` of them; only while no row runs."""
        if self.running:
            raise RuntimeError("the layout changes only while no row runs")
        length = length_bucket(need)
        if self.blocks:
            pool = self._pool(max_rows, length)
            rows = max(1, min(max_rows, pool.shape[1] - 1))
            length = self._longest_row(pool, length)
        else:
            rows = max(1, min(max_rows, self.max_rows(length)))
        if self.layout is not None and (self.layout.rows, self.layout.length) == (rows, length):
            return
        self._drop_graphs()
        self.layout = None
        if self.blocks:
            self.layout = BlockLayout(self.kv_shape.layers, rows, length, pool)
        else:
            self.layout = Layout(self.kv_shape, rows, length, self._arena(rows, length))
        self.rows = [None] * rows

    def _longest_row(self, pool: torch.Tensor, need: int) -> int:
        """With blocks, a row's length bounds nothing but its block table's width: a layout whose rows may grow as
        long as the pool (and the model's positions) allow, so that a prompt needing more than the run's first
        prompts joins as soon as its blocks are free instead of waiting for every row to end (in a burst of mixed
        lengths, the first few prompts gathered set the length, and a longer one came soon after). Dynamic NTK keeps
        the need's length: its graphs hold only up to the original positions (see `graphable`)."""
        positions = self.model.config.get_text_config().max_position_embeddings
        longest = min((pool.shape[1] - 1) * pool.shape[2], positions) // LENGTH_STEP * LENGTH_STEP
        return longest if longest > need and self.graphable(longest) else need

    def _pool(self, rows: int, length: int) -> torch.Tensor:
        """The block pool, [2 x layers, blocks, BLOCK_SIZE, kv_heads, head_dim] over the arena: on CUDA the whole KV
        budget (allocated once), on the CPU enough for `rows` rows of `length` (within the budget); always at least
        one row of `length` and the trash block."""
        shape = self.kv_shape
        per_block = shape.bytes_per_token * BLOCK_SIZE
        budget = self.kv_budget_bytes // per_block
        blocks = budget if self.device.type == "cuda" else min(budget, rows * blocks_for(length))
        blocks = max(blocks, blocks_for(length)) + 1
        elements = blocks * per_block // shape.dtype.itemsize
        arena = self.arena if self.arena is not None and self.arena.numel() >= elements else None
        if arena is None:
            self._drop_graphs()
            self.layout = None
            arena = self._arena(0, 0, elements)
        return arena[:elements].view(
            2 * shape.layers, blocks, BLOCK_SIZE, shape.heads, shape.head_dim)

    def _arena(self, rows: int, length: int, elements: int = 0) -> torch.Tensor:
        """The memory that layouts view: on CUDA the whole KV budget as one buffer, allocated once (changing the
        layout allocates nothing and nothing fragments); on the CPU only as much as the largest layout so far.
        Zeroed: slots that a mask hides must hold finite numbers (0 x NaN would reach the output)."""
        dtype = self.kv_shape.dtype
        elements = elements or rows * length * self.kv_shape.bytes_per_token // dtype.itemsize
        if self.arena is None or self.arena.numel() < elements:
            if self.device.type == "cuda":
                elements = max(elements, self.kv_budget_bytes // dtype.itemsize)
            self._drop_graphs()  # views of the old arena
            self.arena = None
            self.arena = torch.zeros(elements, dtype=dtype, device=self.device)
        return self.arena

    # --- joining ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, tagged: Sequence[tuple[object, Prompt]]) -> list[tuple[object, Completion]]:
        """Prefill the prompts into free rows, in chunks of at most `prefill_tokens` padded tokens; returns the
        rows that ended already (a first token that ends them). The caller checked `fits` and `free_rows`; a
        chunk that fails raises with its rows freed (the rows of earlier chunks go on)."""
        ended: list[tuple[object, Completion]] = []
        with self.rope:
            for chunk in self._chunks(list(tagged)):
                ended += self._prefill([Row(tag, prompt, prompt.length) for tag, prompt in chunk])
        return ended

    def _chunks(self, tagged: list[tuple[object, Prompt]]) -> list[list[tuple[object, Prompt]]]:
        """Consecutive prompts whose left padding to the chunk's longest still fits each row's need."""
        chunks: list[list[tuple[object, Prompt]]] = []
        longest = most_new = 0
        for item in tagged:
            prompt = item[1]
            grown_longest, grown_new = max(longest, prompt.length), max(most_new, prompt.max_new_tokens)
            # Rows of blocks store no padding; rows of one length hold it, so it must fit each row's length.
            if chunks and (grown_longest * (len(chunks[-1]) + 1) <= self.prefill_tokens
                           and (self.blocks or grown_longest + grown_new <= self.layout.length)):
                chunks[-1].append(item)
                longest, most_new = grown_longest, grown_new
            else:
                chunks.append([item])
                longest, most_new = prompt.length, prompt.max_new_tokens
        return chunks

    def _prefill(self, rows: list[Row]) -> list[tuple[object, Completion]]:
        layout = self.layout
        free = [i for i, row in enumerate(self.rows) if row is None][:len(rows)]
        if len(free) < len(rows):
            raise ValueError(f"{len(rows)} prompts for {len(free)} free rows")
        length = max(row.prompt.length for row in rows)
        inputs = collate([row.prompt.inputs for row in rows], length, self.pad_id)
        inputs = {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        mask = inputs["attention_mask"]
        index = torch.tensor(free, device=self.device)
        if self.blocks:
            layout.take(free, [row.prompt.need for row in rows])  # raises, taking none, if they are not free
        try:
            firsts = self._forward(rows, free, index, inputs, length)
        except BaseException:
            if self.blocks:
                layout.free(free)  # the chunk's blocks go back: the caller may prefill its prompts again
            raise
        if self.blocks:
            lengths = torch.tensor([row.prompt.length for row in rows], device=self.device)
            layout.lengths.index_copy_(0, index, lengths)
            layout.live.index_fill_(0, index, 1)
        else:
            row_mask = torch.zeros((len(rows), layout.length), dtype=torch.bool, device=self.device)
            row_mask[:, :length] = mask.bool()
            layout.mask.index_copy_(0, index, row_mask.view(len(rows), 1, 1, -1))
            layout.write.index_fill_(0, index, length)
        layout.positions.index_copy_(0, index, mask.sum(-1, keepdim=True))
        layout.tokens.index_copy_(0, index, firsts.view(-1, 1))
        for i, row, token in zip(free, rows, firsts.tolist(), strict=True):
            row.tokens.append(token)
            row.short = self.long_rope_at is None or row.prompt.length <= self.long_rope_at
            self.rows[i] = row
        return self._settle(free)

    def _forward(self, rows: list[Row], free: list[int], index: torch.Tensor, inputs: dict, length: int):
        """The prefill forward of a chunk (its rows' blocks taken); returns each row's first token. One prompt
        alone goes through its length bucket's LonePrefill where it has one."""
        lone = self._lone(length) if len(rows) == 1 else None
        if lone is not None:
            embed = lone_prefill_module.embeds_of(self.model)
            lone.fill(embed(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes")), free[0])
            if lone.graph is None and not lone.tried and self.use_graphs and self.graphable(lone.length):
                # After the fill: the warm-up writes what the run writes again.
                lone.tried = True
                _capture(lone, f"the prefill of one {lone.length}-token prompt")
            return lone.run().clone()
        mask = inputs["attention_mask"]
        if self.blocks:
            sink = self.layout.prefill_sink(free, [row.prompt.length for row in rows], length)
        else:
            sink = self.layout.prefill_sink(index)
        out = self.model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                         logits_to_keep=1, **{CACHE_KW: sink})
        return out.logits[:, -1].argmax(-1)

    def _lone(self, length: int) -> lone_prefill_module.LonePrefill | None:
        """The LonePrefill of a prompt of `length` tokens (None: this prompt prefills as chunks do)."""
        bucket = length_bucket(length)
        if not self.lone_prefill or bucket > min(lone_prefill_module.MAX_TOKENS, self.layout.length):
            return None
        lone = self.lones.get(bucket)
        if lone is None:
            if len(self.lones) >= lone_prefill_module.GRAPHS:
                return None
            lone = self.lones[bucket] = lone_prefill_module.LonePrefill(self.model, self.layout, bucket, CACHE_KW)
        return lone

    def _drop_graphs(self) -> None:
        """The decode steps and lone prefills of the current layout (they view its arena)."""
        self.steps.clear()
        self.lones.clear()

    # --- decoding -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[object, Completion]]:
        """One decode step of every running row; returns the rows that ended (their rows are free now)."""
        top = max(i for i, row in enumerate(self.rows) if row is not None) + 1
        count = min(row_bucket(top), len(self.rows))
        with self.rope:
            self._step(count).run()
            tokens = self.layout.tokens[:top, 0].tolist()
            live = [i for i in range(top) if self.rows[i] is not None]
            for i in live:
                self.rows[i].tokens.append(tokens[i])
            return self._settle(live)

    def _settle(self, indices: list[int]) -> list[tuple[object, Completion]]:
        """Free the rows that ended; re-prefill the ones that cross long-RoPE's threshold now."""
        ended, crossing = [], []
        for i in indices:
            row = self.rows[i]
            if row.tokens[-1] in self.eos_ids or len(row.tokens) >= row.prompt.max_new_tokens:
                ended.append(i)
            elif row.short and self.long_rope_at is not None and row.prompt.length + len(row.tokens) > \
                    self.long_rope_at:
                crossing.append(i)
        done = [(self.rows[i].tag, self.rows[i].completion()) for i in ended]
        recompute = [_extended(self.rows[i]) for i in crossing]
        self.release(ended + crossing)
        for row in recompute:
            done += self._prefill([row])
        return done

    def _step(self, rows: int) -> DecodeStep:
        step = self.steps.get(rows)
        if step is None:
            kind = BlockDecodeStep if self.blocks else DecodeStep
            step = self.steps[rows] = kind(self.model, self.layout, rows)
            if self.use_graphs and self.graphable(self.layout.length):
                _capture(step, f"the decode step of {rows} rows")
        return step

    @torch.inference_mode()
    def cancel(self, tags: set) -> list[tuple[object, Completion]]:
        """End the rows of these tags now, as canceled."""
        indices = [i for i, row in enumerate(self.rows) if row is not None and row.tag in tags]
        done = [(self.rows[i].tag, self.rows[i].completion(canceled=True)) for i in indices]
        self.release(indices)
        return done

    def release(self, indices: list[int]) -> None:
        if indices:
            self.layout.free(indices)
            for i in indices:
                self.rows[i] = None

    @torch.inference_mode()
    def abort(self) -> list[object]:
        """Drop every row (a step failed: their state is unknown); returns their tags."""
        tags = [row.tag for row in self.rows if row is not None]
        self.release([i for i, row in enumerate(self.rows) if row is not None])
        return tags

    def out_of_memory(self) -> None:
        """A prefill did not fit: smaller prefill chunks from now on (the KV arena is preallocated)."""
        self.prefill_tokens = max(1, self.prefill_tokens // 2)
        log.warning("out of GPU memory in a prefill; prefill chunks lowered to %d tokens", self.prefill_tokens)
        gc.collect()  # cycles that still hold tensors of the failed forward
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def graphable(self, length: int) -> bool:
        """Dynamic NTK picks its frequencies from the longest position: a graph fixes them, so its lengths must
        stay on the side of the threshold that the prefill chose (we keep graphs to the short side)."""
        config = self.model.config.get_text_config()
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") in ("default", "linear", "llama3", *LONG_ROPE_TYPES):
            return True
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        return length <= original

    # --- all at once ----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], on_done: Callable[[int, Completion], None],
                 canceled: Callable[[], set[int]] = lambda: set(), max_rows: int = 0) -> BatchStats:
        """Greedy-decode every prompt; `on_done(i, completion)` fires as each ends. Prompts join as rows free up
        (at most `max_rows` at once, 0: as many as the KV budget holds)."""
        prompts = list(prompts)
        self.plan(max(p.need for p in prompts), max_rows or len(prompts))
        stats = BatchStats(len(prompts), len(self.rows), self.layout.length, self.use_graphs)
        waiting = [(i, p) for i, p in enumerate(prompts) if p.need <= self.layout.length]
        if len(waiting) < len(prompts):
            raise ValueError("every prompt must fit the layout")
        while waiting or self.running:
            started = time.perf_counter()
            joining = self._joining(waiting)
            waiting = waiting[len(joining):]
            for i, completion in self.admit(joining):
                on_done(i, completion)
            stats.prefill_s += time.perf_counter() - started
            stats.peak_rows = max(stats.peak_rows, self.running)
            if not self.running:
                continue
            started = time.perf_counter()
            for i, completion in self.step() + self.cancel(canceled()):
                on_done(i, completion)
            stats.decode_s += time.perf_counter() - started
            stats.steps += 1
        return stats

    def _joining(self, waiting: list[tuple[int, Prompt]]) -> list[tuple[int, Prompt]]:
        """The waiting prompts, FIFO, that free rows (and with blocks, free blocks) take now."""
        joining: list[tuple[int, Prompt]] = []
        for item in waiting[:self.free_rows()]:
            if not self.fits(item[1], [prompt for _, prompt in joining]):
                break
            joining.append(item)
        return joining


def _extended(row: Row) -> Row:
    """The row to prefill again once it crosses long-RoPE's threshold: its prompt and every token so far, run
    with the long factors, as transformers' Phi-3 `generate` does (it drops the cache there and recomputes)."""
    inputs = dict(row.prompt.inputs)
    produced = torch.tensor([row.tokens], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], produced], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(produced)], dim=1)
    prompt = Prompt(inputs, row.prompt.max_new_tokens - len(row.tokens))
    return Row(row.tag, prompt, row.prompt_tokens, carried=row.carried + row.tokens)


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


