"""Capturing a step in a CUDA graph, as the decode step (worker/decoding.py) and a lone prompt's prefill
(worker/lone_prefill.py) both do."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch

from worker.rope import long_rope_modules

WARM_UP = 2  # eager runs before the capture: lazy initialisations and autotuning happen outside the graph


def capture(step: Callable[[], None], model) -> torch.cuda.CUDAGraph:
    """Run `step` (a forward of `model`) WARM_UP times on a side stream, then record it once, under `static_rope`.
    Each graph gets a private memory pool: graphs come and go with their layouts, and a pool shared with a freed
    graph cannot be captured into again. The caller makes the warm-up's writes harmless (they land where the next
    replay writes again, or are put back)."""
    with static_rope(model):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARM_UP):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph


class static_rope:
    """Within the block, rotary embeddings skip transformers' dynamic frequency update (dynamic NTK): it compares
    a tensor in Python, which a CUDA graph cannot capture. Graphs are only used for lengths where the frequencies
    the update would pick cannot change (see `worker.decoding.Decoder.graphable`). Long-RoPE chooses per row
    without a branch."""

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
