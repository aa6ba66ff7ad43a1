"""Capturing a step in a CUDA graph, as the decode step (worker/decoding.py) and a lone prompt's prefill
(worker/lone_prefill.py) both do."""

from __future__ import annotations

from collections.abc import Callable

import torch

WARM_UP = 2  # eager runs before the capture: lazy initialisations and autotuning happen outside the graph


def capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Run `step` WARM_UP times on a side stream, then record it once. Each graph gets a private memory pool: graphs
    come and go with their layouts, and a pool shared with a freed graph cannot be captured into again. The caller
    makes the warm-up's writes harmless (they land where the next replay writes again, or are put back)."""
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
