"""The few-rows matrix product (worker/gemv.py) against the product it replaces.

The kernel sums fp32 products and rounds once, as cuBLAS does; only the order of the sum differs, so its output
must equal the fp32 product rounded to the dtype but for rare one-unit differences. On the CPU it runs in Triton's
interpreter (fp16: numpy has no bf16); on CUDA, compiled, in bf16 against torch.nn.functional.linear (the fused
model's tokens are compared with the unfused model's in test_decoding.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the kernel is compiled for it")
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                            reason="Triton is not installed (it comes with CUDA builds of torch and the test extra)")


@torch.inference_mode()
def gemv_report(device: str, dtype_name: str) -> dict[str, list[float]]:
    """Per case: [fraction of outputs that differ from the rounded fp32 product, largest difference in eps]."""
    from worker import gemv

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    report = {}

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    # Rows of 1 to MAX_ROWS (3: not a power of two), features not multiples of the blocks, a strided input view.
    for rows, n_out, n_in, block_n, block_k in ((1, 37, 1000, 8, 512), (3, 64, 96, 16, 64), (4, 9, 700, 4, 256),
                                                (2, 130, 2048, 8, 1024)):
        wide = rand(rows, 1, n_in + 5)
        x = wide[..., 3:3 + n_in]  # rows apart by n_in + 5: the kernel reads the given row stride
        weight = rand(n_out, n_in) * 0.05
        got = gemv.gemv(x, weight, block_n=block_n, block_k=block_k)
        expected = (x.double() @ weight.double().T).to(dtype)
        assert got.shape == expected.shape == (rows, 1, n_out) and got.dtype == dtype
        diff = (got.double() - expected.double()).abs()
        scale = expected.double().abs().clamp_min(1.0) * torch.finfo(dtype).eps
        report[f"{rows}x{n_in} @ {n_in}x{n_out}"] = [float((got != expected).float().mean()),
                                                    float((diff / scale).max())]
    return report


def check(report: dict[str, list[float]]) -> None:
    assert len(report) == 4
    for name, (differ, units) in report.items():
        assert differ <= 0.05 and units <= 1.0, f"{name}: {differ:.2%} of outputs differ, up to {units:.2f} eps"


@TRITON
def test_gemv_equals_the_product_in_the_triton_interpreter():
    code = ("import json; from tests.unit.worker.test_gemv import gemv_report; "
            "print(json.dumps(gemv_report('cpu', 'float16')))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check(json.loads(out.stdout.strip().splitlines()[-1]))


@CUDA
def test_gemv_equals_the_product_on_cuda():
    check(gemv_report("cuda", "bfloat16"))


@CUDA
def test_linear_takes_the_kernel_for_few_rows_only():
    from worker import gemv

    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    few, many = (torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16) for rows in (gemv.MAX_ROWS, 64))
    assert gemv.fits(few, weight) and not gemv.fits(many, weight)
    assert not gemv.fits(few.float(), weight.float()) and not gemv.fits(few, weight.T)
    assert torch.equal(gemv.linear(few, weight), gemv.gemv(few, weight))
    assert torch.equal(gemv.linear(many, weight), torch.nn.functional.linear(many, weight))


def test_linear_is_torchs_on_the_cpu():
    from worker import gemv

    x, weight, bias = torch.randn(1, 8), torch.randn(4, 8), torch.randn(4)
    assert not gemv.fits(x, weight)
    assert torch.equal(gemv.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
