"""Replicas that all see every GPU take one each, and a GPU is free again as soon as its holder is gone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.gpu_locks import NoFreeGpu, claim_gpu


def test_each_claim_takes_the_next_free_gpu_until_none_is_left(tmp_path):
    first, first_lock = claim_gpu(tmp_path, ["0", "1"])
    second, second_lock = claim_gpu(tmp_path, ["0", "1"])
    assert (first, second) == ("0", "1")
    with pytest.raises(NoFreeGpu):
        claim_gpu(tmp_path, ["0", "1"])
    first_lock.close()  # the replica on GPU 0 ends
    assert claim_gpu(tmp_path, ["0", "1"])[0] == "0"
    second_lock.close()


def test_a_killed_holder_leaves_its_gpu_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from cli.gpu_locks import claim_gpu; "
        f"gpu, lock = claim_gpu(Path({str(tmp_path)!r}), ['0']); print(gpu, flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "0"
    with pytest.raises(NoFreeGpu):
        claim_gpu(tmp_path, ["0"])
    holder.kill()
    holder.wait()
    assert claim_gpu(tmp_path, ["0"])[0] == "0"
