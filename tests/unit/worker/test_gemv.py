"""The few-rows matrix product (worker/gemv.py) against the product it replaces.

The kernel sums fp32 products and rounds once, as cuBLAS does; only the order of the sum differs, so its output
must equal the fp32 product rounded to the dtype but for rare one-unit differences. On the CPU it runs in Triton's
interpreter (fp16: numpy has no bf16); on CUDA, compiled, in bf16 against torch.nn.functional.linear (the fused
model's tokens are compared with the unfused model's in test_decoding.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernel_checks import check_rounding, report_in_interpreter, rounding

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
        assert got.shape == (rows, 1, n_out)
        report[f"{rows}x{n_in} @ {n_in}x{n_out}"] = rounding(got, expected)
    return report


def check(report: dict[str, list[float]]) -> None:
    check_rounding(report, 4, 0.05)


@TRITON
def test_gemv_equals_the_product_in_the_triton_interpreter():
    check(report_in_interpreter("tests.unit.worker.test_gemv", "gemv_report", "cpu", "float16"))


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
