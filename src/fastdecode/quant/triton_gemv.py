"""Our own batch-1 weight-only GEMV kernels (Triton), for decode on CUDA.

Decode multiplies one activation row by every weight matrix: pure bandwidth. These
kernels read the int8 / packed-int4 weights once, dequantize in registers, accumulate in
float32 and apply scales (and int4 zeros) before the single store — so nothing overflows
in float16 and nothing is materialised. Rows of x > 1 (prefill) take the dequantize +
matmul path in the modules instead. ``TRITON_INTERPRET=1`` runs them on the CPU (tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn in (4, 8, 16, 32) for bk in (128, 256, 512) for w in (2, 4, 8)
            if bn * bk <= 8192]


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mn = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mk = kk < K
        x = tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=mn[:, None] & mk[None, :],
                    other=0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K: tl.constexpr,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # w: uint8 [N, K/2], low nibble = even k; s, z: [N, K/GROUP]; BLOCK_K multiple of GROUP.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rh = tl.arange(0, BLOCK_K // 2)
    NG: tl.constexpr = BLOCK_K // GROUP
    rg = tl.arange(0, NG)
    groups = K // GROUP
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rh)[None, :],
                    mask=mn[:, None], other=0)
        lo = (p & 0xF).to(tl.float32) - 8.0
        hi = (p >> 4).to(tl.float32) - 8.0
        xe = tl.load(x_ptr + k0 + 2 * rh).to(tl.float32)
        xo = tl.load(x_ptr + k0 + 2 * rh + 1).to(tl.float32)
        dot = tl.sum(tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BLOCK_N, NG, GROUP // 2)),
                     axis=2)
        sx = tl.sum(tl.reshape(xe + xo, (NG, GROUP // 2)), axis=1)
        g = k0 // GROUP + rg
        s = tl.load(s_ptr + rn[:, None] * groups + g[None, :], mask=mn[:, None], other=0.0)
        z = tl.load(z_ptr + rn[:, None] * groups + g[None, :], mask=mn[:, None], other=0.0)
        acc += tl.sum(s.to(tl.float32) * dot + z.to(tl.float32) * sx[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=mn)


_int8_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"])(_int8_gemv_kernel)


@functools.cache
def _int4_tuned(group: int):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": group * m}, num_warps=w)
               for bn in (4, 8, 16, 32) for m in (1, 2, 4) for w in (2, 4, 8)
               if group * m <= 1024 and bn * group * m <= 16384]
    return triton.autotune(configs=configs, key=["N", "K"])(_int4_gemv_kernel)


def int8_gemv(x, w, scale, bias, autotune: bool = True):
    """x [1, K] @ dequant(w [N, K] int8, scale [N]).T + bias -> [1, N]."""
    N, K = w.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else scale
    if autotune:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _int8_tuned[grid](x, w, scale, b, y, N, K, HAS_BIAS=has_bias)
    else:
        _int8_gemv_kernel[(triton.cdiv(N, 8),)](x, w, scale, b, y, N, K, HAS_BIAS=has_bias,
                                               BLOCK_N=8, BLOCK_K=128)
    return y


def int4_gemv(x, w, scale, zero, bias, group: int, autotune: bool = True):
    """x [1, K] @ dequant(w [N, K/2] packed, scale/zero [N, K/group]).T + bias -> [1, N]."""
    N = w.shape[0]
    K = w.shape[1] * 2
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else scale
    if autotune:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _int4_tuned(group)[grid](x, w, scale, zero, b, y, N, K, GROUP=group, HAS_BIAS=has_bias)
    else:
        _int4_gemv_kernel[(triton.cdiv(N, 8),)](x, w, scale, zero, b, y, N, K, GROUP=group,
                                               HAS_BIAS=has_bias, BLOCK_N=8, BLOCK_K=group)
    return y
