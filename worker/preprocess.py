"""A job's CPU work before the GPU: decode its images and run the model's processor, in processes of their own so
that this work never holds the GIL that the GPU thread needs between decode steps.

Why processes: the processor (Phi-3-vision's HD transform: PIL resizes, the crops' normalization, the tokenizer,
transformers' checks) is Python and numpy/torch work, much of it under the GIL. In the worker's one process every
millisecond of it is a millisecond in which the GPU thread may wait to launch its next step: the system reached
0.85x the decoder alone. A child process holds only its own GIL. What crosses: the image bytes going in (fetched
by the task thread, so that network, Redis, the SSRF guard and the key's access all stay in the worker, and the
headers checked there: bounds and the job's pixels before any decode) and the tensors coming back, their bytes
read straight into the worker's tensors (~3.4 MB for one image at num_crops=4 in bf16). The same `Encoder`
(worker/encoder.py) runs inline and in a child, so a job's tensors are the same either way.

`VISIONQ_PREPROCESS_PROCESSES` sizes the pool: `auto` is min(4, CPUs - 1) on CUDA and 0 on the CPU (there the GPU
thread is itself CPU work; more processes would take its cores), 0 runs everything in the task thread.

Lifetime: the pool (worker/encoder_pool.py) starts with the worker and is warm before the worker says it is ready;
`close` (Celery's worker_shutdown, after the warm shutdown has drained the tasks) ends it; a SIGKILLed worker's
processes end within 0.5 s. A process that dies (a decoder crash) loses only its job: another process
replaces it and the job is sent once more; a job that kills the second one too fails as `image_unreadable`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Literal

import torch

from shared.config import Settings
from shared.errors import ImageUnreadable
from worker.decoding import Prompt
from worker.encoder import Encoder
from worker.encoder_pool import EncoderPool, ProcessDied


def pool_size(setting: int | Literal["auto"], device: torch.device) -> int:
    """How many preprocessing processes: the setting, or for `auto` min(4, CPUs - 1) on CUDA and none on the CPU."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


class Preprocessor:
    """Turns a job's image bytes and question into its Prompt: in the calling thread (`processes` 0) or in a pool
    of processes that each load the processor only (worker/encoder_pool.py)."""

    def __init__(self, settings: Settings, encoder: Encoder, processes: int,
                 on_respawn: Callable[[list[int]], None] = lambda pids: None):
        self.settings, self.encoder, self.processes = settings, encoder, processes
        self.alone = threading.Lock()  # held by the one job a pool's owner prepares `here` (see `prepare`)
        self.pool = EncoderPool(settings, encoder.dtype, processes, on_respawn) if processes else None

    @property
    def pids(self) -> list[int]:
        """The pool's processes (none without a pool)."""
        return self.pool.pids if self.pool else []

    def prepare(self, blobs: list[bytes], question: str, max_new_tokens: int, num_crops: int | None,
                here: bool = False) -> Prompt:
        """Decode (shared/images/decode.py, with its bounds) and encode; image errors keep their codes. In the
        calling thread without a pool, or when asked `here` while no other job is being prepared here that way
        (an idle GPU's lone job: the pool's round trip would be its latency); else in the pool."""
        if not self.processes:
            return self._here(blobs, question, max_new_tokens, num_crops)
        if here and self.alone.acquire(blocking=False):
            try:
                return self._here(blobs, question, max_new_tokens, num_crops)
            finally:
                self.alone.release()
        try:
            return Prompt(self.pool.encode(blobs, question, num_crops, max_new_tokens), max_new_tokens)
        except ProcessDied:
            raise ImageUnreadable("an image of the job crashed the image decoder") from None
        except TimeoutError:
            raise ImageUnreadable(f"the job's images took longer than {self.settings.job_timeout_s} s to prepare") \
                from None

    def _here(self, blobs: list[bytes], question: str, max_new_tokens: int, num_crops: int | None) -> Prompt:
        return Prompt(self.encoder.encode_bytes(blobs, question, num_crops, self.settings), max_new_tokens)

    def close(self) -> None:
        """End the pool's processes (once no job needs them: the worker's tasks have ended)."""
        if self.pool is not None:
            self.pool.close()
