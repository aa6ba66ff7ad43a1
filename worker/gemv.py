"""Matrix products of a few rows (Triton): the decode step's linear layers when one job, or a handful, decode.

At one row a decode step is almost all weight reads: Phi-3-mini's 7.4 GB of projections, every step. Profiled on
the H200 (bench/gpu_profile.py), cuBLAS read them at ~3.2 TB/s at one row (some shapes split over K with a
separate reduce kernel, 161 us of a 3.1 ms step), where the card streams ~4.3 TB/s. `linear` computes
`x @ weight.T` for `rows <= MAX_ROWS` rows with one pass over the weight: each program takes a few output features
and every row, walks the input dimension, and sums in fp32 (as cuBLAS does, in another order), then rounds once.
More rows, other dtypes, or no Triton: `torch.nn.functional.linear`. bench/gemv.py measures both per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

MAX_ROWS = 1  # the default bound (Settings.gemv_max_rows): at 2 rows cuBLAS is already faster (bench/gemv.py)
DTYPES = (torch.bfloat16, torch.float16)
# (output features, input features) per program and the launch settings, from bench/gemv.py's sweep on the H200.
BLOCK_N, BLOCK_K, WARPS, STAGES = 2, 1024, 2, 1


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, rows, n_out, n_in, x_row_stride, w_row_stride, out_row_stride,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_N output features of every row: acc[row, n, k] gathers products over the input dimension, summed
        over k once at the end (one reduction, not one a tile)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        k = tl.arange(0, BLOCK_K)
        n_inside, r_inside = n < n_out, r < rows
        w_rows = w_ptr + n[:, None].to(tl.int64) * w_row_stride
        x_rows = x_ptr + r[:, None].to(tl.int64) * x_row_stride
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, n_in, BLOCK_K):
            cols = start + k
            inside = cols < n_in
            w = tl.load(w_rows + cols[None, :], mask=n_inside[:, None] & inside[None, :], other=0.0)
            x = tl.load(x_rows + cols[None, :], mask=r_inside[:, None] & inside[None, :], other=0.0)
            acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
        out = tl.sum(acc, axis=2).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None].to(tl.int64) * out_row_stride + n[None, :], out,
                 mask=r_inside[:, None] & n_inside[None, :])


def fits(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether `linear` takes the kernel's path for these tensors."""
    return (triton is not None and x.is_cuda and x.dtype in DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1] and x.stride(-1) == 1
            and x.numel() // max(1, x.shape[-1]) <= max_rows)


def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
         num_warps: int = WARPS, num_stages: int = STAGES) -> torch.Tensor:
    """`x @ weight.T` by the kernel (x [..., in] of a few rows, weight [out, in] with unit column stride)."""
    n_out, n_in = weight.shape
    rows = x.reshape(-1, n_in)
    if rows.shape[0] > 1 and rows.stride(0) < n_in:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n_out), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        rows, weight, out, rows.shape[0], n_out, n_in, rows.stride(0), weight.stride(0), out.stride(0),
        ROWS=triton.next_power_of_2(max(1, rows.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return out.view(*x.shape[:-1], n_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = MAX_ROWS) -> torch.Tensor:
    """`torch.nn.functional.linear`, by the kernel when there are at most `max_rows` rows."""
    if not fits(x, weight, max_rows):
        return F.linear(x, weight, bias)
    out = gemv(x, weight)
    return out if bias is None else out + bias
