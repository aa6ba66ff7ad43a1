"""The preprocessing pool (worker/preprocess.py) on the tiny models: its prompts equal the inline ones bit for bit,
image errors keep their codes across the process boundary, a dead pool process is replaced, its processes end
with the worker (closed, or the worker SIGKILLed), and a job asked `here` skips it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from shared.config import Settings
from shared.errors import ImageUnreadable
from tests.images import encode, random_image
from tests.processes import alive, wait_gone
from worker.encoder import Encoder
from worker.encoder_pool import EncoderProcess
from worker.preprocess import Preprocessor

QUESTION = "Describe this image in detail."


@pytest.fixture(scope="module")
def phi3v_path(tmp_path_factory):
    from cli.tiny_model import build_tiny_phi3v

    return build_tiny_phi3v(tmp_path_factory.mktemp("phi3v") / "model")


@pytest.fixture(scope="module")
def pooled(phi3v_path):
    """One pool process on the tiny Phi-3-V, bf16 (the dtype numpy lacks: its bytes travel as such), and the same
    inline."""
    settings = Settings(model=str(phi3v_path))
    encoder = Encoder(settings.model, False, torch.bfloat16)
    pool = Preprocessor(settings, encoder, processes=1)
    yield pool, Preprocessor(settings, encoder, processes=0)
    pool.close()


def blobs(*seeds: int) -> list[bytes]:
    return [encode(random_image(300 + 20 * seed, 200, seed), "PNG") for seed in seeds]


@pytest.mark.parametrize("num_crops", [None, 1, 16])
def test_the_pool_gives_exactly_the_inline_prompt(pooled, num_crops):
    pool, inline = pooled
    assert len(pool.pids) == 1 and pool.pids[0] != os.getpid()
    images = blobs(1, 2)
    got = pool.prepare(images, QUESTION, 7, num_crops)
    want = inline.prepare(images, QUESTION, 7, num_crops)
    assert got.max_new_tokens == 7 and set(got.inputs) == set(want.inputs)
    for name, tensor in want.inputs.items():
        assert got.inputs[name].dtype == tensor.dtype and torch.equal(got.inputs[name], tensor), name
    assert got.inputs["pixel_values"].dtype == torch.bfloat16


def test_an_image_error_keeps_its_code_across_the_process_boundary(pooled):
    pool, _ = pooled
    truncated = blobs(3)[0][:200]
    with pytest.raises(ImageUnreadable) as failed:
        pool.prepare([truncated], QUESTION, 4, None)
    assert failed.value.code == "image_unreadable"
    assert pool.prepare(blobs(4), QUESTION, 4, None).length > 0  # the process goes on


def test_a_dead_pool_process_is_replaced_and_the_job_still_runs(pooled):
    pool, inline = pooled
    told = []
    pool.pool.on_respawn = told.append  # the worker records the new pids (worker/context.py)
    before = pool.pids
    os.kill(before[0], signal.SIGKILL)
    assert wait_gone(before) == []
    got = pool.prepare(blobs(5), QUESTION, 4, 4)
    assert torch.equal(got.inputs["input_ids"], inline.prepare(blobs(5), QUESTION, 4, 4).inputs["input_ids"])
    assert pool.pids and pool.pids != before and told == [pool.pids]


def test_a_process_past_its_timeout_is_killed_and_its_job_fails_with_a_timeout(phi3v_path):
    process = EncoderProcess(Settings(model=str(phi3v_path)), torch.float32)
    process.wait_ready()
    with pytest.raises(TimeoutError):
        process.encode(blobs(7), QUESTION, None, timeout_s=0)  # no image decodes and encodes in no time
    assert wait_gone([process.pid]) == []


def test_close_ends_the_pool_processes(phi3v_path):
    pool = Preprocessor(Settings(model=str(phi3v_path)), Encoder(str(phi3v_path), False, torch.float32), 1)
    pids = pool.pids
    assert all(alive(pid) for pid in pids)
    pool.close()
    assert wait_gone(pids) == []
    with pytest.raises(RuntimeError):
        pool.prepare(blobs(1), QUESTION, 4, None)


def test_a_job_asked_here_skips_the_pool_one_at_a_time(phi3v_path):
    """`here` (an idle worker's lone job, VISIONQ_PREPROCESS_INLINE_WHEN_IDLE) runs in the caller's process: it
    works with the pool closed, and gives the inline prompt; while another job holds that turn, it takes the pool
    (closed here: it fails)."""
    settings = Settings(model=str(phi3v_path))
    encoder = Encoder(settings.model, False, torch.bfloat16)
    pool = Preprocessor(settings, encoder, 1)
    pool.close()
    got = pool.prepare(blobs(6), QUESTION, 5, 4, here=True)
    want = Preprocessor(settings, encoder, 0).prepare(blobs(6), QUESTION, 5, 4)
    for name, tensor in want.inputs.items():
        assert torch.equal(got.inputs[name], tensor), name
    with pool.alone, pytest.raises(RuntimeError):
        pool.prepare(blobs(6), QUESTION, 5, 4, here=True)


CHILD = """
import sys, time, torch
from shared.config import Settings
from worker.encoder_pool import EncoderProcess
from worker.encoder import Encoder
from worker.preprocess import Preprocessor
if __name__ == "__main__":
    pool = Preprocessor(Settings(model=sys.argv[1]), Encoder(sys.argv[1], False, torch.float32), 2)
    print(",".join(map(str, pool.pids)), flush=True)
    time.sleep(600)
"""


def test_the_pool_processes_exit_when_their_worker_is_sigkilled(phi3v_path, tmp_path):
    script = tmp_path / "worker_like.py"
    script.write_text(CHILD)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    worker = subprocess.Popen([sys.executable, str(script), str(phi3v_path)], stdout=subprocess.PIPE, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [root, os.environ.get("PYTHONPATH")]))})
    try:
        pids = [int(pid) for pid in worker.stdout.readline().strip().split(",")]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        worker.kill()  # SIGKILL: no atexit, no shutdown, nothing tells the children
        worker.wait()
        assert wait_gone(pids) == []  # their sockets closed with the worker, and their parent is gone
    finally:
        worker.kill()
