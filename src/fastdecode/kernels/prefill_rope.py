"""One pass from a prefill chunk's q/k/v projection to rotated keys and values, each
[Hkv, T, D] contiguous: the eager path's strided copies and elementwise kernels were a
large share of a long prefill (perf/results/h200-prefill-*.json). The queries are rotated
inside the flash kernel (kernels/flash_prefill.py), or here with ``queries=True`` (the
``flash-q-rope`` prefill kernel, kept for the A/B: at 16k the attention kernel took 44 ms
with this layout, perf/results/h200-prefill-20e625b.json, and 57 with the rotation inside
it, perf/results/h200-prefill-25d3383.json). The same float32 arithmetic as ``rope.apply``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError


@triton.jit
def _prefill_rope(X, COS, SIN, COSS, SINS, Q, QS, K, V, T, H, HKV, sx_t, sx_h, sc_t,
                  D: tl.constexpr, HALF: tl.constexpr, BD: tl.constexpr,
                  BLOCK_T: tl.constexpr, QUERIES: tl.constexpr, HAS_SINK: tl.constexpr):
    tb = tl.program_id(0)
    h = tl.program_id(1) + (0 if QUERIES else H)  # a head of qkv (queries: all of them)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BD)
    rmask = rows < T
    m = rmask[:, None] & (d < D)[None, :]
    x_ptr = X + rows[:, None] * sx_t + h * sx_h
    x = tl.load(x_ptr + d[None, :], mask=m, other=0.0)
    if h >= H + HKV:  # values: a copy into [Hkv, T, D]
        tl.store(V + (h - H - HKV) * T * D + rows[:, None] * D + d[None, :], x, mask=m)
    else:
        rot = d < 2 * HALF
        first = d < HALF
        partner = tl.where(first, d + HALF, tl.where(rot, d - HALF, d))
        xp = tl.load(x_ptr + partner[None, :], mask=m, other=0.0).to(tl.float32)
        ci = tl.where(first, d, d - HALF)
        cm = rmask[:, None] & rot[None, :]
        sign = tl.where(first, -1.0, 1.0)[None, :]
        xf = x.to(tl.float32)
        c = tl.load(COS + rows[:, None] * sc_t + ci[None, :], mask=cm, other=1.0).to(tl.float32)
        s = tl.load(SIN + rows[:, None] * sc_t + ci[None, :], mask=cm, other=0.0).to(tl.float32)
        out = tl.where(rot[None, :], xf * c + sign * xp * s, xf)
        if h < H:  # a query head (QUERIES only), and its copy rotated at the sink position
            tl.store(Q + h * T * D + rows[:, None] * D + d[None, :],
                     out.to(Q.dtype.element_ty), mask=m)
            if HAS_SINK:
                c2 = tl.load(COSS + rows[:, None] * sc_t + ci[None, :], mask=cm,
                             other=1.0).to(tl.float32)
                s2 = tl.load(SINS + rows[:, None] * sc_t + ci[None, :], mask=cm,
                             other=0.0).to(tl.float32)
                out2 = tl.where(rot[None, :], xf * c2 + sign * xp * s2, xf)
                tl.store(QS + h * T * D + rows[:, None] * D + d[None, :],
                         out2.to(QS.dtype.element_ty), mask=m)
        else:
            tl.store(K + (h - H) * T * D + rows[:, None] * D + d[None, :],
                     out.to(K.dtype.element_ty), mask=m)


def prefill_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, rot,
                 rot_sink=None, queries: bool = False):
    """``qkv`` [T, Hq + 2 Hkv, D] and (cos, sin) [T, rotary_dim // 2] at the text positions
    -> (k rotated, v) [Hkv, T, D]; ``queries``: (q, q_sink or None, k, v), q rotated at the
    text positions and q_sink at ``rot_sink``'s (None: no sinks)."""
    T, NH, D = qkv.shape
    if NH != num_heads + 2 * num_kv_heads or qkv.stride(-1) != 1:
        raise InputError(f"prefill_rope: qkv {tuple(qkv.shape)} does not hold {num_heads} + "
                         f"2 x {num_kv_heads} heads with a contiguous last dim")
    cos, sin = (t.contiguous() for t in rot)
    has_sink = queries and rot_sink is not None
    cos_s, sin_s = (t.contiguous() for t in rot_sink) if has_sink else (cos, sin)
    opts = dict(dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((num_kv_heads, T, D), **opts)
    v = torch.empty((num_kv_heads, T, D), **opts)
    q = torch.empty((num_heads, T, D), **opts) if queries else k
    qs = torch.empty((num_heads, T, D), **opts) if has_sink else q
    block_t = 16 if not qkv.is_cuda else 32
    grid = (triton.cdiv(T, block_t), 2 * num_kv_heads + (num_heads if queries else 0))
    _prefill_rope[grid](qkv, cos, sin, cos_s, sin_s, q, qs, k, v, T, num_heads,
                        num_kv_heads, qkv.stride(0), qkv.stride(1), cos.stride(0), D=D,
                        HALF=cos.shape[-1], BD=triton.next_power_of_2(D), BLOCK_T=block_t,
                        QUERIES=queries, HAS_SINK=has_sink, num_warps=4)
    return (q, qs if has_sink else None, k, v) if queries else (k, v)
