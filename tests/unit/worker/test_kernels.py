"""The fused kernels (worker/kernels.py) against the eager transformers code they replace.

Each kernel rounds where the eager code rounds, so outputs must be equal but for rare one-unit differences (the
order of an fp32 sum, exp and rsqrt implementations). On the CPU they run in Triton's interpreter (fp16: numpy has
no bf16 and the interpreter truncates it); on CUDA, compiled, in bf16 and fp16, and inside a model whose greedy
tokens are compared with the same model unfused.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernel_checks import check_rounding, report_in_interpreter, rounding

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the kernels are compiled for it")
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                            reason="Triton is not installed (it comes with CUDA builds of torch and the test extra)")


@torch.inference_mode()
def kernel_report(device: str, dtype_name: str) -> dict[str, list[float]]:
    """Per kernel and case: [fraction of elements that differ from eager, largest difference in units of eps]."""
    from transformers.activations import QuickGELUActivation
    from transformers.models.phi3 import modeling_phi3

    from worker import kernels

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    report = {}

    def compare(name, got, expected):
        report[name] = rounding(got, expected)

    for rows, width in ((37, 3072), (5, 100)):
        x, weight = rand(rows, width, scale=3), rand(width, scale=0.1) + 1
        norm = modeling_phi3.Phi3RMSNorm(width, eps=1e-5).to(device=device, dtype=dtype)
        norm.weight.data.copy_(weight)
        compare(f"rms_norm {rows}x{width}", kernels.rms_norm(x, weight, 1e-5), norm(x))
    batch, heads, length, head_dim = 2, 5, 7, 96
    qkv = rand(batch, length, 3 * heads * head_dim)  # queries and keys as strided views, as attention makes them
    q = qkv[..., :heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    k = qkv[..., heads * head_dim:2 * heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    for rotary_dim, cos_batch in ((96, batch), (64, batch), (96, 1)):
        cos, sin = rand(cos_batch, length, rotary_dim), rand(cos_batch, length, rotary_dim)
        expected_q, expected_k = modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)
        compare(f"rotary q dim {rotary_dim} cos batch {cos_batch}", kernels.rotary(q, cos, sin), expected_q)
        compare(f"rotary k dim {rotary_dim} cos batch {cos_batch}", kernels.rotary(k, cos, sin), expected_k)
        for name, got, want in zip("qk", kernels.rotary_pair(q, k, cos, sin), (expected_q, expected_k), strict=True):
            compare(f"rotary pair {name} dim {rotary_dim} cos batch {cos_batch}", got, want)
    # Grouped-query heads: fewer keys than queries, the same strides (views of one projection).
    k_few = qkv[..., heads * head_dim:(heads + 2) * head_dim].view(batch, length, 2, head_dim).transpose(1, 2)
    expected_q, expected_k = modeling_phi3.apply_rotary_pos_emb(q, k_few, cos, sin)
    for name, got, want in zip("qk", kernels.rotary_pair(q, k_few, cos, sin), (expected_q, expected_k), strict=True):
        compare(f"rotary pair {name}, 2 key heads", got, want)
    # Phi-3-mini's 32 + 32 heads: more than one program's share of heads per token.
    wide = rand(batch, 3, 3 * 32 * head_dim)
    q_wide, k_wide = (wide[..., i * 32 * head_dim:(i + 1) * 32 * head_dim].view(batch, 3, 32, head_dim).transpose(1, 2)
                      for i in range(2))
    cos, sin = rand(batch, 3, head_dim), rand(batch, 3, head_dim)
    expected_q, expected_k = modeling_phi3.apply_rotary_pos_emb(q_wide, k_wide, cos, sin)
    for name, got, want in zip("qk", kernels.rotary_pair(q_wide, k_wide, cos, sin), (expected_q, expected_k),
                               strict=True):
        compare(f"rotary pair {name}, 32 + 32 heads", got, want)
    gate, up = rand(9, 2 * 1500, scale=4).chunk(2, dim=-1)
    compare("silu_mul", kernels.silu_mul(gate, up), up * torch.nn.functional.silu(gate))
    x = rand(3, 50, 333, scale=4)
    compare("quick_gelu", kernels.quick_gelu(x), QuickGELUActivation()(x))
    return report


def check(report: dict[str, list[float]]) -> None:
    check_rounding(report, 20, 0.01)


@TRITON
def test_kernels_equal_eager_in_the_triton_interpreter():
    check(report_in_interpreter("tests.unit.worker.test_kernels", "kernel_report", "cpu", "float16"))


@CUDA
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernels_equal_eager_on_cuda(dtype):
    check(kernel_report("cuda", dtype))


def test_nothing_is_fused_on_the_cpu(tmp_path):
    from transformers import AutoModelForImageTextToText

    from cli.tiny_model import build_tiny_phi3v
    from worker import kernels

    model = AutoModelForImageTextToText.from_pretrained(build_tiny_phi3v(tmp_path / "model"))
    forwards = [m.forward for m in model.modules()]
    assert kernels.fuse(model) == []
    assert [m.forward for m in model.modules()] == forwards
