"""One GPU per replica when every replica sees every GPU (`docker compose up --scale worker=N` cannot give each
replica its own device): each replica takes the first GPU whose lock file in a shared folder is free.

The lock is an flock held by the supervisor's open file: the kernel drops it when the process ends, however it
ends, so a crashed replica never leaves a GPU claimed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class NoFreeGpu(RuntimeError):
    """Every GPU's lock is held by another replica."""


def claim_gpu(lock_dir: Path, gpus: list[str]) -> tuple[str, IO]:
    """Lock the first free GPU of `gpus`; returns it and the open lock file (keep it open while the GPU is used)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        handle = open(lock_dir / f"gpu{gpu}.lock", "a+")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return gpu, handle
    raise NoFreeGpu(f"all of GPUs {','.join(gpus)} are taken by other replicas (locks in {lock_dir})")
