"""Both LayerNorms of a parallel-residual block (GPT-NeoX) from one read of x, and x plus
the two output biases (the residual the output projections add into, via addmm): three
passes over [T, hidden] became one (perf/results/h200-prefill-0e1f695.json: LayerNorm was
5.0 ms of a 16k prefill). The same float32 arithmetic as ``nn.LayerNorm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError


@triton.jit
def _dual_layer_norm(X, W1, B1, W2, B2, RB, Y1, Y2, R, N, sx, eps,
                     BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RB: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    xn = xc * rstd
    y1 = xn * tl.load(W1 + cols, mask=m, other=0.0).to(tl.float32)
    y2 = xn * tl.load(W2 + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y1 += tl.load(B1 + cols, mask=m, other=0.0).to(tl.float32)
        y2 += tl.load(B2 + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y1 + row * N + cols, y1.to(Y1.dtype.element_ty), mask=m)
    tl.store(Y2 + row * N + cols, y2.to(Y2.dtype.element_ty), mask=m)
    if HAS_RB:
        x += tl.load(RB + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(R + row * N + cols, x.to(R.dtype.element_ty), mask=m)


def dual_layer_norm(x: torch.Tensor, norm1, norm2, residual_bias: torch.Tensor | None = None):
    """``x`` [T, N] and two ``nn.LayerNorm`` of width N (same eps) -> (norm1(x), norm2(x),
    x + residual_bias, or a copy of x), each [T, N] contiguous in x's dtype: the residual
    is a fresh tensor the projections may add into in place."""
    T, N = x.shape
    if x.stride(-1) != 1 or norm1.weight.numel() != N or norm2.weight.numel() != N \
            or norm1.eps != norm2.eps:
        raise InputError(f"dual_layer_norm: x {tuple(x.shape)} does not fit the two norms")
    has_bias = norm1.bias is not None and norm2.bias is not None
    if (norm1.bias is None) != (norm2.bias is None):
        raise InputError("dual_layer_norm: one norm has a bias, the other not")
    y1, y2, r = (torch.empty((T, N), dtype=x.dtype, device=x.device) for _ in range(3))
    has_rb = residual_bias is not None
    block = triton.next_power_of_2(N)
    _dual_layer_norm[(T,)](x, norm1.weight, norm1.bias if has_bias else norm1.weight,
                           norm2.weight, norm2.bias if has_bias else norm2.weight,
                           residual_bias if has_rb else norm1.weight, y1, y2, r, N,
                           x.stride(0), norm1.eps, BLOCK=block, HAS_BIAS=has_bias,
                           HAS_RB=has_rb, num_warps=8 if block >= 2048 else 4)
    return y1, y2, r
