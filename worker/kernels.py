"""Fused elementwise kernels (Triton) for the hot path of the model on CUDA.

Profiled on an H100 (bench/gpu_profile.py), half of a Phi-3-vision prefill's GPU time went to elementwise kernels
while its matrix products ran at ~790 TFLOP/s: transformers' eager RMSNorm makes five passes over the hidden states
in fp32, rotary embeddings six over the queries and keys, SiLU-and-multiply two, and CLIP's quick-GELU three. Each
kernel here makes one pass, and rounds where the eager code rounds (after every bf16 operation), so its outputs
equal the eager ones but for the order of an fp32 sum (tests/unit/test_kernels.py compares them).

`fuse(model)` swaps them into a loaded model, on CUDA in bf16/fp16 only and only for module types whose eager
formula they reproduce; everything else keeps transformers' code. Without Triton (CPU builds of torch) nothing is
fused.
"""

from __future__ import annotations

import logging
import os
import sys
import types

import torch

from worker import gemv

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch come without Triton
    triton = None
else:
    # CUDA's exp and rsqrt (libdevice), as PyTorch's kernels call them; Triton's interpreter (TRITON_INTERPRET=1,
    # the kernels on the CPU for tests) has only its own.
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

log = logging.getLogger(__name__)

# Module types whose forward is exactly the formula the kernels compute (transformers 5.x).
RMS_NORMS = frozenset({"Phi3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
FUSED_GATE_UP_MLPS = frozenset({"Phi3MLP"})  # gate_up_proj -> chunk(2) -> up * silu(gate) -> down_proj
SPLIT_GATE_UP_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})  # down(silu(gate(x)) * up(x))
ROTARY_MODULES = ("phi3", "llama", "mistral", "qwen2")  # transformers.models.<name>.modeling_<name>
DTYPES = gemv.DTYPES  # bf16 and fp16: the dtypes every kernel here and in worker/gemv.py takes
# Products and sums are rounded one by one, as eager PyTorch rounds them: no fused multiply-adds.
EXACT = {"enable_fp_fusion": False}


if triton is not None:

    @triton.jit
    def _exp(x):
        if INTERPRETED:
            return tl.exp(x)
        else:
            return libdevice.exp(x)

    @triton.jit
    def _rsqrt(x):
        if INTERPRETED:
            return tl.math.rsqrt(x)
        else:
            return libdevice.rsqrt(x)

    @triton.jit
    def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, x_row_stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        variance = tl.math.div_rn(tl.sum(x * x, axis=0), n_cols * 1.0)
        normed = (x * _rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, weight * normed, mask=inside)

    @triton.jit
    def _rotary_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, out_x_ptr, out_y_ptr, heads, split, length, head_dim, half,
                       x_batch_stride, x_head_stride, x_pos_stride, cs_batch_stride, cs_pos_stride,
                       HEADS: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr):
        """One token (batch b, position p), HEADS of the heads of x (those below `split`) and then of y (the rest;
        the same strides): out = x * cos + rotate_half(x) * sin; dims past 2 * half pass through. Queries and keys
        in one launch, the heads over a few programs (at one row, one program for all 64 took twice as long)."""
        token = tl.program_id(0).to(tl.int64)
        b, p = token // length, token % length
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        of_x = h < split
        of_y = (h >= split) & (h < heads)
        head = tl.where(of_x, h, h - split)
        offset = b * x_batch_stride + head * x_head_stride + p * x_pos_stride
        x_in, y_in = of_x & (d < half), of_y & (d < half)
        # In the tensors' own dtype: each product and the sum rounded as eager bf16/fp16 arithmetic rounds them.
        x1 = tl.where(of_x, tl.load(x_ptr + offset + d, mask=x_in, other=0.0),
                      tl.load(y_ptr + offset + d, mask=y_in, other=0.0))
        x2 = tl.where(of_x, tl.load(x_ptr + offset + half + d, mask=x_in, other=0.0),
                      tl.load(y_ptr + offset + half + d, mask=y_in, other=0.0))
        cs = b * cs_batch_stride + p * cs_pos_stride + d
        cos1 = tl.load(cos_ptr + cs, mask=d < half, other=0.0)
        cos2 = tl.load(cos_ptr + cs + half, mask=d < half, other=0.0)
        sin1 = tl.load(sin_ptr + cs, mask=d < half, other=0.0)
        sin2 = tl.load(sin_ptr + cs + half, mask=d < half, other=0.0)
        first = x1 * cos1 + -x2 * sin1
        second = x2 * cos2 + x1 * sin2
        out_x = out_x_ptr + ((b * split + head) * length + p) * head_dim
        out_y = out_y_ptr + ((b * (heads - split) + head) * length + p) * head_dim
        tl.store(out_x + d, first, mask=x_in)
        tl.store(out_x + half + d, second, mask=x_in)
        tl.store(out_y + d, first, mask=y_in)
        tl.store(out_y + half + d, second, mask=y_in)
        if PASS > 0:
            rest = tl.arange(0, PASS)[None, :]
            keep = rest < head_dim - 2 * half
            kept = tl.where(of_x, tl.load(x_ptr + offset + 2 * half + rest, mask=of_x & keep, other=0.0),
                            tl.load(y_ptr + offset + 2 * half + rest, mask=of_y & keep, other=0.0))
            tl.store(out_x + 2 * half + rest, kept, mask=of_x & keep)
            tl.store(out_y + 2 * half + rest, kept, mask=of_y & keep)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=inside, other=0.0)
        act = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(dtype)
        tl.store(out_ptr + row * n_cols + cols, up * act, mask=inside)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        scaled = (x.to(tl.float32) * 1.702).to(dtype).to(tl.float32)
        gate = tl.math.div_rn(1.0, 1.0 + _exp(-scaled)).to(dtype)
        tl.store(out_ptr + offsets, x * gate, mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)` over the last dimension, in one pass."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), n, eps, BLOCK=block,
                                       num_warps=min(16, max(1, block // 256)), **EXACT)
    return out.view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [batch, heads, length, head_dim] (any strides but the last) with cos and sin
    [batch or 1, length, rotary_dim]; a new contiguous tensor, as transformers' `apply_rotary_pos_emb` returns."""
    return _rotary(x, x, cos, sin)[0]


def rotary_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rotary` of the queries and the keys in one launch when they share their strides (views of one projection,
    as Phi-3's fused qkv makes them; a decode step runs it once a layer), else in two."""
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.stride() != k.stride():
        return rotary(q, cos, sin), rotary(k, cos, sin)
    return _rotary(q, k, cos, sin)


def _rotary(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    batch, x_heads, length, head_dim = x.shape
    heads = x_heads + (y.shape[1] if y is not x else 0)
    half = cos.shape[-1] // 2
    out_x = torch.empty((batch, x_heads, length, head_dim), dtype=x.dtype, device=x.device)
    out_y = torch.empty((batch, heads - x_heads, length, head_dim), dtype=x.dtype, device=x.device) if y is not x \
        else out_x
    cos_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    per_program = min(16, triton.next_power_of_2(heads))
    _rotary_kernel[(batch * length, triton.cdiv(heads, per_program))](
        x, y, cos, sin, out_x, out_y, heads, x_heads, length, head_dim, half, x.stride(0), x.stride(1), x.stride(2),
        cos_batch_stride, cos.stride(1), HEADS=per_program, HALF=triton.next_power_of_2(half),
        PASS=triton.next_power_of_2(head_dim - 2 * half) if head_dim > 2 * half else 0,
        num_warps=4, **EXACT)
    return out_x, out_y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`up * silu(gate)` (each rounded to the dtype, as eager), for row-major views such as gate_up.chunk(2)."""
    n = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, n), up.reshape(-1, n)
    if gate_rows.stride(-1) != 1 or up_rows.stride(-1) != 1:
        gate_rows, up_rows = gate_rows.contiguous(), up_rows.contiguous()
    out = torch.empty((gate_rows.shape[0], n), dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(n, block))](
        gate_rows, up_rows, out, gate_rows.stride(0), up_rows.stride(0), n, BLOCK=block, num_warps=4, **EXACT)
    return out.view(*gate.shape[:-1], n)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """`x * sigmoid(1.702 * x)` in one pass."""
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    block = 2048
    _quick_gelu_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), BLOCK=block, num_warps=8, **EXACT)
    return out.view(x.shape)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_gate_up_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(silu_mul(gate, up))


def _split_gate_up_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


def _few_rows_linear(max_rows: int):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight, self.bias, max_rows)
    return forward


class QuickGELU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


def _fused_rotary(original):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`, fused where the tensors allow it."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs.get("unsqueeze_dim", 1) != 1 or set(kwargs) - {"unsqueeze_dim"} or not _rotary_fits(
                q, k, cos, sin):
            return original(q, k, cos, sin, *args, **kwargs)
        return rotary_pair(q, k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def _rotary_fits(q, k, cos, sin) -> bool:
    return (q.is_cuda and q.dtype in DTYPES and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
            and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.stride() == sin.stride()
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
            and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= q.shape[-1] and cos.shape[1] == q.shape[2])


def fusable(model) -> bool:
    parameter = next(model.parameters())
    return triton is not None and parameter.is_cuda and parameter.dtype in DTYPES


def fuse(model, gemv_max_rows: int = gemv.MAX_ROWS) -> list[str]:
    """Swap the fused kernels into `model` where its modules allow; returns what was fused (for the log). Linear
    layers take worker/gemv.py's kernel for inputs of at most `gemv_max_rows` rows (0: never)."""
    if not fusable(model):
        return []
    fused = {type(module).__name__ for module in model.modules() if _fuse_module(module, gemv_max_rows)}
    for family in ROTARY_MODULES:
        modeling = sys.modules.get(f"transformers.models.{family}.modeling_{family}")
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is not None and any(type(m).__module__ == modeling.__name__ for m in model.modules()):
            if not hasattr(original, "__wrapped__"):
                modeling.apply_rotary_pos_emb = _fused_rotary(original)
            fused.add(f"{family} rotary")
    log.info("fused kernels in use: %s", ", ".join(sorted(fused)) or "none")
    return sorted(fused)


def _fuse_module(module, gemv_max_rows: int) -> bool:
    """Swap the kernels into one module if its type is one they reproduce; whether it was."""
    name = type(module).__name__
    if name == "Linear" and gemv_max_rows > 0:
        module.forward = types.MethodType(_few_rows_linear(gemv_max_rows), module)
    elif name in RMS_NORMS:
        module.forward = types.MethodType(_rms_norm_forward, module)
    elif name in FUSED_GATE_UP_MLPS and _silu(module.activation_fn):
        module.forward = types.MethodType(_fused_gate_up_forward, module)
    elif name in SPLIT_GATE_UP_MLPS and _silu(module.act_fn):
        module.forward = types.MethodType(_split_gate_up_forward, module)
    elif name == "CLIPMLP" and type(module.activation_fn).__name__ == "QuickGELUActivation":
        module.activation_fn = QuickGELU()
    else:
        return False
    return True


def _silu(activation) -> bool:
    return type(activation).__name__ in ("SiLUActivation", "SiLU")
