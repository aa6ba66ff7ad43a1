"""Block attention (worker/paged_attention.py): the Triton kernel against the torch reference, and the reference
against plain attention over each row's own tokens.

The kernel runs on the CPU in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, as the fused kernels'
test does) and, compiled, on CUDA. Rows of lengths 1 to a few blocks, a block just full and one just begun, blocks
scattered over the pool in no order, grouped-query heads, a head_dim that is not a power of two (Phi-3's 96), and
a row's blocks walked by one program or split over several (whose partial sums are merged).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernel_checks import report_in_interpreter

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the kernel is compiled for it")
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                            reason="Triton is not installed (it comes with CUDA builds of torch and the test extra)")
LENGTHS = [1, 63, 64, 65, 200, 7]


def case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int = 64):
    """Query, pools, table and lengths of LENGTHS rows, each row's blocks drawn at random from the pool."""
    generator = torch.Generator().manual_seed(heads * 100 + head_dim)
    columns = max(-(-n // block_size) for n in LENGTHS) + 1
    pool_blocks = len(LENGTHS) * columns + 1
    keys = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=generator)
    values = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=generator)
    order = torch.randperm(pool_blocks - 1, generator=generator) + 1
    table = order[:len(LENGTHS) * columns].view(len(LENGTHS), columns).to(torch.int32)
    query = torch.randn(len(LENGTHS), heads, 1, head_dim, generator=generator)
    seen = torch.tensor(LENGTHS, dtype=torch.int32)
    move = {"device": device}
    return (query.to(dtype=dtype, **move), keys.to(dtype=dtype, **move), values.to(dtype=dtype, **move),
            table.to(**move), seen.to(**move))


def plain(query, keys, values, table, seen, scale) -> torch.Tensor:
    """Each row alone: its tokens gathered in order, softmax attention in fp32, no masks."""
    rows, heads, _, head_dim = query.shape
    block_size, kv_heads = keys.shape[1], keys.shape[2]
    out = []
    for row in range(rows):
        n = int(seen[row])
        ids = table[row, :-(-n // block_size)].long()
        k = keys[ids].reshape(-1, kv_heads, head_dim)[:n].float().repeat_interleave(heads // kv_heads, dim=1)
        v = values[ids].reshape(-1, kv_heads, head_dim)[:n].float().repeat_interleave(heads // kv_heads, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", query[row, :, 0].float(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out).unsqueeze(1)


@torch.inference_mode()
def kernel_report(device: str, dtype_name: str) -> dict[str, float]:
    """Per case: the largest difference of the kernel from plain attention, and of the reference from it."""
    from worker import paged_attention

    dtype = getattr(torch, dtype_name)
    report = {}
    for heads, kv_heads, head_dim in ((4, 2, 16), (4, 4, 96), (8, 1, 64)):
        query, keys, values, table, seen = case(device, dtype, heads, kv_heads, head_dim)
        scale = head_dim ** -0.5
        expected = plain(query, keys, values, table, seen, scale)
        for splits in (1, 4):  # each row's blocks walked by one program, or shared by four and merged
            got = paged_attention._triton_decode(query, keys, values, table, seen, scale, splits=splits)
            assert got.shape == expected.shape and got.dtype == dtype
            report[f"kernel {heads}/{kv_heads} x {head_dim}, {splits} splits"] = float(
                (got.float() - expected).abs().max())
        reference = paged_attention.reference_decode(query, keys, values, table, seen, scale)
        report[f"reference {heads}/{kv_heads} x {head_dim}"] = float((reference.float() - expected).abs().max())
        report[f"write {kv_heads} x {head_dim}"] = write_difference(keys, values, heads, kv_heads, head_dim)
    return report


def write_difference(keys, values, heads: int, kv_heads: int, head_dim: int) -> float:
    """write_kv of a decode step's new keys and values (strided views of one projection, as attention makes them)
    into scattered slots, against two index_copy_: the largest difference between the pools (0: a copy)."""
    rows = len(LENGTHS)
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * head_dim).to(keys)
    key_states = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(rows, 1, kv_heads, head_dim)
    value_states = qkv[..., (heads + kv_heads) * head_dim:].view(rows, 1, kv_heads, head_dim)
    key_states, value_states = key_states.transpose(1, 2), value_states.transpose(1, 2)
    slots = torch.randperm(keys.shape[0] * keys.shape[1])[:rows].to(keys.device)
    got = keys.clone(), values.clone()
    from worker import paged_attention

    paged_attention.write_kv(key_states, value_states, *got, slots)
    expected = keys.clone(), values.clone()
    flat = (-1, kv_heads, head_dim)
    expected[0].view(flat).index_copy_(0, slots, key_states[:, :, 0])
    expected[1].view(flat).index_copy_(0, slots, value_states[:, :, 0])
    assert not torch.equal(expected[0], keys)
    return max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))


def check(report: dict[str, float], tolerance: float) -> None:
    assert len(report) == 12
    for name, difference in report.items():
        assert difference <= (0.0 if name.startswith("write") else tolerance), f"{name}: off by {difference:.2e}"


@TRITON
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_the_kernel_equals_plain_attention_in_the_triton_interpreter(dtype, tolerance):
    check(report_in_interpreter("tests.unit.worker.test_paged_attention", "kernel_report", "cpu", dtype), tolerance)


@torch.inference_mode()
def fp8_pools_report(device: str) -> dict[str, float]:
    """fp8 pools (bench/decode_attention.py's --kv-dtype) with a float16 query: the kernel against plain attention
    over the same fp8 values, per split count."""
    from worker import paged_attention

    query, keys, values, table, seen = case(device, torch.float16, 4, 2, 16)
    keys, values = keys.to(torch.float8_e4m3fn), values.to(torch.float8_e4m3fn)
    expected = plain(query, keys.to(torch.float16), values.to(torch.float16), table, seen, 0.25)
    return {f"{splits} splits": float((paged_attention._triton_decode(query, keys, values, table, seen, 0.25,
                                                                       splits=splits).float() - expected).abs().max())
            for splits in (1, 4)}


def fp8_write_report(device: str, representable: str = "") -> dict[str, float]:
    """write_kv into fp8 pools (VISIONQ_KV_CACHE_DTYPE=fp8), one key past fp8's range, against `store` (the
    torch path: saturate, convert, copy bytes): how many pool bytes differ, and the saturated key's value. With
    `representable`, the other values are fp8 values already: Triton's interpreter rounds fp8 wrongly (1.987 to
    1.0), so there only the kernel's copying and saturation are compared, and the rounding on CUDA."""
    from worker import paged_attention

    rows, kv_heads, head_dim = len(LENGTHS), 2, 16
    pools = [torch.zeros(8, 64, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device) for _ in range(4)]
    states = torch.randn(rows, kv_heads, 1, head_dim, device=device, dtype=torch.float16)
    if representable:
        states = states.to(torch.float8_e4m3fn).to(torch.float16)
    states[0, 0, 0, 0] = 1000.0  # past 448: saturates
    slots = torch.randperm(8 * 64)[:rows].to(device)
    paged_attention.write_kv(states, states, pools[0], pools[1], slots)
    for pool in pools[2:]:
        paged_attention.store(pool.view(-1, kv_heads, head_dim), slots, states[:, :, 0])
    differ = sum(int((a.view(torch.uint8) != b.view(torch.uint8)).sum()) for a, b in
                 zip(pools[:2], pools[2:], strict=True))
    return {"bytes that differ": float(differ),
            "saturated": float(pools[0].view(-1, kv_heads, head_dim)[slots[0], 0, 0].float())}


@TRITON
def test_the_kernel_reads_fp8_pools_in_the_querys_dtype_in_the_triton_interpreter():
    report = report_in_interpreter("tests.unit.worker.test_paged_attention", "fp8_pools_report", "cpu")
    assert len(report) == 2 and all(difference <= 2e-3 for difference in report.values()), report


@TRITON
def test_the_write_kernel_saturates_into_fp8_pools_as_the_torch_path_does_in_the_triton_interpreter():
    report = report_in_interpreter("tests.unit.worker.test_paged_attention", "fp8_write_report", "cpu",
                                   "representable")
    assert report == {"bytes that differ": 0.0, "saturated": 448.0}, report


def test_storing_into_an_fp8_pool_saturates_instead_of_making_nan():
    report = fp8_write_report("cpu")  # write_kv takes the torch path here (no interpreter)
    assert report == {"bytes that differ": 0.0, "saturated": 448.0}, report


@CUDA
def test_the_write_kernel_rounds_into_fp8_pools_as_torch_does_on_cuda():
    assert fp8_write_report("cuda") == {"bytes that differ": 0.0, "saturated": 448.0}


def test_the_reference_equals_plain_attention():
    from worker import paged_attention

    query, keys, values, table, seen = case("cpu", torch.float32, 4, 2, 16)
    got = paged_attention.reference_decode(query, keys, values, table, seen, 0.25)
    assert (got - plain(query, keys, values, table, seen, 0.25)).abs().max() <= 1e-5


@CUDA
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_the_kernel_equals_plain_attention_on_cuda(dtype, tolerance):
    check(kernel_report("cuda", dtype), tolerance)
