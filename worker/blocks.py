"""The KV cache by blocks: one pool of fixed-size blocks shared by every row, a block table per row.

A row holds exactly its own tokens, in the blocks its table row names: no row is padded to the longest row's
length, and a prefill stores a prompt without its left padding. A prompt is admitted only when the blocks for its
whole need (prompt + max_new_tokens) are free, and takes them all at once: a running row never waits for memory and
is never preempted, so the pool cannot run out mid-decode (the cost: a row that ends early by end-of-sequence held
blocks it did not fill). Its blocks go back to the pool the moment it ends or is canceled.

Block 0 is never handed out: free rows of a decode step (the step runs a fixed row-count bucket) point every
table entry at it and write their throwaway keys and values there. The pool is zeroed once, so whatever attention
reads there is finite.
"""

from __future__ import annotations

import torch

from worker.paged_attention import store, write_kv

BLOCK_SIZE = 64  # tokens per block: one iteration of the attention kernel's loop over a row's blocks
TRASH = 0  # the block that free rows write to


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


class BlockKV:
    """The cache of the first `rows` rows for a decode step, quacking like transformers' Cache: attention layers call
    `update`, which writes each row's new key and value at its slot (device tensors, so a captured graph advances
    them) and returns the layer's whole pools, which block attention (worker/paged_attention.py) reads through the
    table."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor):
        self.keys, self.values, self.slots = keys, values, slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        write_kv(key_states, value_states, keys, values, self.slots)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed


class BlockLayout:
    """`rows` rows of at most `length` tokens over a pool of blocks, and the decode state of every row (device
    tensors). The pool outlives layouts; a layout changes only while no row runs, so it starts with every block
    free."""

    def __init__(self, layers: int, rows: int, length: int, pool: torch.Tensor, block_size: int = BLOCK_SIZE):
        if pool.shape[0] != 2 * layers or pool.shape[2] != block_size:
            raise ValueError(f"a pool of shape {tuple(pool.shape)} is not {2 * layers} layers of {block_size}-token "
                             f"blocks")
        self.keys, self.values = list(pool[:layers]), list(pool[layers:])
        self.rows, self.length, self.block_size = rows, length, block_size
        self.blocks = pool.shape[1]
        if blocks_for(length, block_size) > self.blocks - 1:
            raise ValueError(f"a pool of {self.blocks} blocks cannot hold one row of {length} tokens")
        self.free_blocks = list(range(self.blocks - 1, TRASH, -1))  # popped from the end: low ids first
        self.owned: list[list[int]] = [[] for _ in range(rows)]
        device = pool.device
        # One spare column past the longest row: a capture's warm-up steps may write a slot or two past a row's end.
        self.table = torch.full((rows, blocks_for(length, block_size) + 1), TRASH, dtype=torch.int32, device=device)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens cached before this step
        self.live = torch.zeros(rows, dtype=torch.long, device=device)  # 1 for running rows: their lengths advance
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)  # where this step writes (pool-wide)
        self.seen = torch.ones(rows, dtype=torch.int32, device=device)  # tokens this step attends to

    def fits(self, need: int, also: int = 0) -> bool:
        """Whether a row of `need` tokens can be admitted now, beside rows of `also` blocks admitted with it."""
        return need <= self.length and blocks_for(need, self.block_size) + also <= len(self.free_blocks)

    def take(self, rows: list[int], needs: list[int]) -> None:
        """Hand each row the blocks of its need; their table rows go to the device in one copy."""
        counts = [blocks_for(need, self.block_size) for need in needs]
        if sum(counts) > len(self.free_blocks):
            raise ValueError(f"{sum(counts)} blocks asked for, {len(self.free_blocks)} free")
        tables = torch.full((len(rows), self.table.shape[1]), TRASH, dtype=torch.int32)
        for i, (row, count) in enumerate(zip(rows, counts, strict=True)):
            self.owned[row] = [self.free_blocks.pop() for _ in range(count)]
            tables[i, :count] = torch.tensor(self.owned[row], dtype=torch.int32)
        self.table.index_copy_(0, torch.tensor(rows, device=self.table.device), tables.to(self.table.device))

    def free(self, rows: list[int]) -> None:
        """Give the rows' blocks back and reset their state: they write to the trash block from now on."""
        for row in rows:
            self.free_blocks += reversed(self.owned[row])
            self.owned[row] = []
        index = torch.tensor(rows, device=self.tokens.device)
        self.table.index_fill_(0, index, TRASH)
        for state in (self.tokens, self.positions, self.lengths, self.live):
            state.index_fill_(0, index, 0)

    def view(self, rows: int) -> BlockKV:
        return BlockKV(self.keys, self.values, self.slots[:rows])

    def slots_of(self, row: int, tokens: int) -> torch.Tensor:
        """The pool-wide slots of a row's first `tokens` tokens, through its blocks in order (on the CPU)."""
        own = torch.arange(tokens)
        blocks = torch.tensor(self.owned[row], dtype=torch.long)[own // self.block_size]
        return blocks * self.block_size + own % self.block_size

    def prefill_sink(self, rows: list[int], lengths: list[int], padded: int):
        """A cache for one prefill chunk (left-padded to `padded` tokens) that stores each row's own tokens, not its
        padding, in its blocks from slot 0, and hands the keys and values back to attention unchanged."""
        from transformers import DynamicCache

        device = self.tokens.device
        source, target = [], []
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            target.append(self.slots_of(row, length))
            source.append(i * padded + padded - length + torch.arange(length))
        source_index, target_index = torch.cat(source).to(device), torch.cat(target).to(device)
        cache = DynamicCache()

        def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
            for states, pool in ((key_states, self.keys[layer_idx]), (value_states, self.values[layer_idx])):
                tokens = states.transpose(1, 2).reshape(-1, *pool.shape[2:])  # [rows * padded, kv_heads, head_dim]
                store(pool.view(-1, *pool.shape[2:]), target_index, tokens.index_select(0, source_index))
            return key_states, value_states

        cache.update = update
        return cache

    def cached(self, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's cached keys and values of one layer, [kv_heads, tokens, head_dim] (for tests and probes)."""
        length = int(self.lengths[row])
        ids = torch.tensor(self.owned[row], device=self.table.device)

        def gather(pool):
            return pool[ids].reshape(-1, *pool.shape[2:])[:length].transpose(0, 1)

        return gather(self.keys[layer]), gather(self.values[layer])
