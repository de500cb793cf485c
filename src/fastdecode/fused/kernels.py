"""Triton kernels of the fused decode step (batch 1, one token): the norms, a GEMV with
its activation, bias and residual fused in, rotary + cache write, and split-K attention.

Each mirrors a piece of the eager model, accumulating in float32 and rounding where it
rounds, and is held equal to it by ``tests/test_fused.py``. Weight formats (``FMT``): 0 =
float, 1 = int8 (a scale per row and group of ``GROUP`` inputs), 2 = int4 (two codes a byte
along K, low nibble first, ``w = (q - 8) * scale + zero``). int4 code paths (``I4``): 0 = a
dot product a group, 1 = dequantise then reduce, 2 = tensor cores (``tl.dot`` over each
group's exact codes, ``KSPLIT`` warps a program).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def norm_kernel(x_ptr, nw_ptr, nb_ptr, out_ptr, eps, K: tl.constexpr, NORM: tl.constexpr,
                BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[seg] = norm_seg(x) as the eager module rounds it, one program a norm (NORM: 1 =
    LayerNorm, 2 = RMSNorm); where x fits one block it is read once, after the weights."""
    _pdl_start(PDL)
    seg = tl.program_id(0)
    if K <= BLOCK_K:
        kk = tl.arange(0, BLOCK_K)
        m = kk < K
        w = tl.load(nw_ptr + seg * K + kk, mask=m, other=0.0)
        b = w  # RMSNorm: no bias
        if NORM == 1:
            b = tl.load(nb_ptr + seg * K + kk, mask=m, other=0.0)
        _pdl_wait(PDL)
        xf = tl.load(x_ptr + kk, mask=m, other=0.0).to(tl.float32)
        mean, rstd = _stats(tl.sum(xf, axis=0), tl.sum(xf * xf, axis=0), eps, K, NORM)
        y = _norm_apply(xf, w, b, mean, rstd, out_ptr.dtype.element_ty, NORM)
        tl.store(out_ptr + seg * K + kk, y.to(out_ptr.dtype.element_ty), mask=m)
    else:
        _pdl_wait(PDL)
        mean, rstd = _norm_stats(x_ptr, eps, K, NORM, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            y = _load_x(x_ptr, kk, nw_ptr + seg * K, nb_ptr + seg * K, mean, rstd, K, NORM)
            tl.store(out_ptr + seg * K + kk, y.to(out_ptr.dtype.element_ty), mask=kk < K)


@triton.jit
def _norm_stats(x_ptr, eps, K: tl.constexpr, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, 1/std) of x [K] in float32 as :func:`norm_kernel` takes them (RMSNorm: mean 0)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    acc2 = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        acc += x
        acc2 += x * x
    return _stats(tl.sum(acc, axis=0), tl.sum(acc2, axis=0), eps, K, NORM)


@triton.jit
def _stats(s, s2, eps, K: tl.constexpr, NORM: tl.constexpr):
    """(mean, 1/std) from the float32 sums of x and of x**2 (RMSNorm: mean 0)."""
    ms = s2 / K
    mean = 0.0
    if NORM == 1:
        mean = s / K
        ms = tl.maximum(ms - mean * mean, 0.0)
    return mean, 1.0 / tl.sqrt(ms + eps)


@triton.jit
def _load_x(x_ptr, kk, nw_ptr, nb_ptr, mean, rstd, K: tl.constexpr, NORM: tl.constexpr):
    """float32 inputs kk of a GEMV: x (NORM 0) or norm(x), rounded as :func:`norm_kernel`."""
    m = kk < K
    x = tl.load(x_ptr + kk, mask=m, other=0.0)
    if NORM == 0:
        return x.to(tl.float32)
    w = tl.load(nw_ptr + kk, mask=m, other=0.0)
    b = w
    if NORM == 1:
        b = tl.load(nb_ptr + kk, mask=m, other=0.0)
    return _norm_apply(x.to(tl.float32), w, b, mean, rstd, x.dtype, NORM)


@triton.jit
def _norm_apply(xf, w, b, mean, rstd, dt: tl.constexpr, NORM: tl.constexpr):
    """norm(x) in float32, rounded to ``dt`` as the eager module rounds (``b``: LayerNorm)."""
    if NORM == 1:
        y = (xf - mean) * rstd * w.to(tl.float32) + b.to(tl.float32)
    else:
        y = w * (xf * rstd).to(dt)
    return y.to(dt).to(tl.float32)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper+): let the next kernel's programs be placed."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel's writes: nothing it writes is read, nothing written, before."""
    if PDL:
        gdc_wait()


@triton.jit
def _i8_to_f32(w, ASM: tl.constexpr):
    """int8 codes -> float32; ASM: through the float32 magic number 2**23 (a permute and a
    subtraction a code)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m;
            xor.b32 t, $4, 0x80808080;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, t, m, 0x7540;
            prmt.b32 $1, t, m, 0x7541;
            prmt.b32 $2, t, m, 0x7542;
            prmt.b32 $3, t, m, 0x7543;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r", args=[w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return w.to(tl.float32)


@triton.jit
def _u4_to_f32(p, ASM: tl.constexpr):
    """Packed int4 bytes -> (low nibble - 8, high nibble - 8) as float32, by the same
    magic number as :func:`_i8_to_f32` (nibbles masked four bytes at a time)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, m;
            and.b32 lo, $8, 0x0F0F0F0F;
            shr.b32 hi, $8, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, lo, m, 0x7540;
            prmt.b32 $1, lo, m, 0x7541;
            prmt.b32 $2, lo, m, 0x7542;
            prmt.b32 $3, lo, m, 0x7543;
            prmt.b32 $4, hi, m, 0x7540;
            prmt.b32 $5, hi, m, 0x7541;
            prmt.b32 $6, hi, m, 0x7542;
            prmt.b32 $7, hi, m, 0x7543;
            sub.f32 $0, $0, 0f4B000008;
            sub.f32 $1, $1, 0f4B000008;
            sub.f32 $2, $2, 0f4B000008;
            sub.f32 $3, $3, 0f4B000008;
            sub.f32 $4, $4, 0f4B000008;
            sub.f32 $5, $5, 0f4B000008;
            sub.f32 $6, $6, 0f4B000008;
            sub.f32 $7, $7, 0f4B000008;
            }""",
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[p],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        return (p & 0xF).to(tl.float32) - 8.0, (p >> 4).to(tl.float32) - 8.0


@triton.jit
def _u4_to_dot(p, DT: tl.constexpr, ASM: tl.constexpr):
    """Packed int4 bytes -> (low - 8, high - 8) in ``DT``, exact; ASM (bfloat16): nibbles in
    the mantissa of 128.0, minus 136 two at a time (fma.bf16x2)."""
    if ASM and DT == tl.bfloat16:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, m, one, off;
            and.b32 lo, $4, 0x0F0F0F0F;
            shr.b32 hi, $4, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            mov.b32 m, 0x43434343;
            mov.b32 one, 0x3F803F80;
            mov.b32 off, 0xC308C308;
            prmt.b32 $0, lo, m, 0x5140;
            prmt.b32 $1, lo, m, 0x7362;
            prmt.b32 $2, hi, m, 0x5140;
            prmt.b32 $3, hi, m, 0x7362;
            fma.rn.bf16x2 $0, $0, one, off;
            fma.rn.bf16x2 $1, $1, one, off;
            fma.rn.bf16x2 $2, $2, one, off;
            fma.rn.bf16x2 $3, $3, one, off;
            }""",
            constraints="=r,=r,=r,=r,r", args=[p],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return ((p & 0xF).to(tl.float32) - 8.0).to(DT), ((p >> 4).to(tl.float32) - 8.0).to(DT)


@triton.jit
def _load_w(w_ptr, rows, mrow, k0, K: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The raw weight tile of inputs [k0, k0 + BLOCK_K) (int4: [BLOCK_N, groups, GROUP / 2])."""
    if FMT == 2:
        NG: tl.constexpr = BLOCK_K // GROUP
        HG: tl.constexpr = GROUP // 2
        g = k0 // GROUP + tl.arange(0, NG)
        kb = (g * HG)[:, None] + tl.arange(0, HG)[None, :]
        return tl.load(w_ptr + rows[:, None, None] * (K // 2) + kb[None, :, :],
                       mask=mrow[:, None, None] & (g < K // GROUP)[None, :, None],
                       other=8 + (8 << 4))
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        other = 0.0 if FMT == 0 else 0
        return tl.load(w_ptr + rows[:, None] * K + kk[None, :],
                       mask=mrow[:, None] & (kk < K)[None, :], other=other)


@triton.jit
def _chunk(acc, acc2, w, k0, x_ptr, s_ptr, z_ptr, rows, mrow, nw_ptr, nb_ptr, mean, rstd,
           K: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
           ASM: tl.constexpr, I4: tl.constexpr, NORM: tl.constexpr):
    """Add one tile's products (float: into ``acc2``; int8: ``acc2`` flushed into ``acc``
    times the scale each group; int4: ``acc += s_g sum (q - 8) x + z_g sum x`` a group)."""
    NGRP: tl.constexpr = K // GROUP
    if FMT == 2:
        NG: tl.constexpr = BLOCK_K // GROUP
        HG: tl.constexpr = GROUP // 2
        g = k0 // GROUP + tl.arange(0, NG)
        mg = g < NGRP
        kk = k0 + tl.arange(0, BLOCK_K)  # x read contiguously, then split even/odd k
        x = _load_x(x_ptr, kk, nw_ptr, nb_ptr, mean, rstd, K, NORM)
        xe, xo = tl.split(tl.reshape(x, (NG, HG, 2)))  # [NG, HG] each
        lo, hi = _u4_to_f32(w, ASM)
        m2 = mrow[:, None] & mg[None, :]
        s = tl.load(s_ptr + rows[:, None] * NGRP + g[None, :], mask=m2, other=0.0)
        z = tl.load(z_ptr + rows[:, None] * NGRP + g[None, :], mask=m2, other=0.0)
        s = s.to(tl.float32)
        z = z.to(tl.float32)
        if I4 == 1:
            # dequantise each weight (w = (q - 8) s + z) and accumulate elementwise: two
            # FMAs a weight and no reduction until the end
            acc2 += (lo * s[:, :, None] + z[:, :, None]) * xe[None, :, :] + \
                (hi * s[:, :, None] + z[:, :, None]) * xo[None, :, :]
        else:
            dot = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BLOCK_N, NG]
            sx = tl.sum(xe + xo, axis=1)  # [NG]
            acc += tl.sum(s * dot + z * sx[None, :], axis=1)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        x = _load_x(x_ptr, kk, nw_ptr, nb_ptr, mean, rstd, K, NORM)
        if FMT == 1:
            acc2 += _i8_to_f32(w, ASM) * x[None, :]
            if (k0 + BLOCK_K) % GROUP == 0:
                s = tl.load(s_ptr + rows * NGRP + k0 // GROUP, mask=mrow, other=0.0)
                acc += tl.sum(acc2, axis=1) * s.to(tl.float32)
                acc2 = tl.zeros_like(acc2)
        else:
            acc2 += w.to(tl.float32) * x[None, :]
    return acc, acc2


@triton.jit
def _dot_rows(x_ptr, w_ptr, s_ptr, z_ptr, rows, mrow, nw_ptr, nb_ptr, eps,
              K: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, I4: tl.constexpr,
              NORM: tl.constexpr):
    """float32 [BLOCK_N]: norm(x) . W[rows, :]; the first weight tile loaded before the PDL
    wait (weights are never written)."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    if FMT == 2:
        if I4 == 1:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K // GROUP, GROUP // 2), tl.float32)
        else:
            acc2 = tl.zeros((1, 1, 1), tl.float32)  # unused
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    w = _load_w(w_ptr, rows, mrow, 0, K, FMT, GROUP, BLOCK_K)
    _pdl_wait(PDL)
    mean = 0.0
    rstd = 1.0
    if NORM != 0:
        mean, rstd = _norm_stats(x_ptr, eps, K, NORM, BLOCK_K)
    acc, acc2 = _chunk(acc, acc2, w, 0, x_ptr, s_ptr, z_ptr, rows, mrow, nw_ptr, nb_ptr, mean,
                       rstd, K, FMT, GROUP, BLOCK_K, ASM, I4, NORM)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _load_w(w_ptr, rows, mrow, k0, K, FMT, GROUP, BLOCK_K)
        acc, acc2 = _chunk(acc, acc2, w, k0, x_ptr, s_ptr, z_ptr, rows, mrow, nw_ptr, nb_ptr,
                           mean, rstd, K, FMT, GROUP, BLOCK_K, ASM, I4, NORM)
    if FMT == 0:
        acc = tl.sum(acc2, axis=1)
    if FMT == 2 and I4 == 1:
        acc = tl.sum(tl.sum(acc2, axis=2), axis=1)
    return acc


@triton.jit
def _dot_rows_mma(x_ptr, w_ptr, s_ptr, z_ptr, rows, mrow, nw_ptr, nb_ptr, eps, part,
                  K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                  KSPLIT: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr,
                  ASM: tl.constexpr, NORM: tl.constexpr):
    """:func:`_dot_rows` for int4 on tensor cores: each of ``KSPLIT`` warps takes a range of
    groups (one batched ``tl.dot``, x repeated over the mma's 16 columns, column 0 kept),
    ``acc += scale * dot + zero * sum(x)``; with ``PARTS`` > 1, part ``part`` of the groups."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    HG: tl.constexpr = GROUP // 2
    NGRP: tl.constexpr = K // GROUP
    GPP: tl.constexpr = (NGRP + PARTS - 1) // PARTS
    GPS: tl.constexpr = (GPP + KSPLIT - 1) // KSPLIT
    COLS: tl.constexpr = 16
    sp = tl.arange(0, KSPLIT)
    _pdl_wait(PDL)
    mean = 0.0
    rstd = 1.0
    if NORM != 0:
        mean, rstd = _norm_stats(x_ptr, eps, K, NORM, 1024)
    acc = tl.zeros((KSPLIT, BLOCK_N, COLS), tl.float32)
    # this part's groups, [g0, g0 + ng): the pointers moved to g0, groups counted from it
    g0 = 0
    ng = NGRP
    if PARTS > 1:
        g0 = part * GPP
        if NGRP % PARTS == 0:  # all parts alike: the bound a constant
            ng = GPP
        else:
            ng = tl.minimum(NGRP - g0, GPP)
        w_ptr += g0 * HG
        s_ptr += g0
        z_ptr += g0
    xp = x_ptr + g0 * GROUP
    for gi in range(0, GPS):
        g = sp * GPS + gi  # [KSPLIT]
        mg = g < ng
        hb = g[:, None] * HG + tl.arange(0, HG)[None, :]
        # masked codes read as 0 (not 8: cp.async fills zeros, anything else costs a select
        # a byte); their scale and zero are 0, so they add nothing
        p = tl.load(w_ptr + rows[None, :, None] * (K // 2) + hb[:, None, :],
                    mask=mg[:, None, None] & mrow[None, :, None], other=0)
        kk = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # >= ng GROUP where g is not
        if NORM == 0:  # loaded as it is: Triton pipelines it like the codes
            x = tl.load(xp + kk, mask=kk < ng * GROUP, other=0.0)
        else:
            x = _load_x(x_ptr, g0 * GROUP + kk, nw_ptr, nb_ptr, mean, rstd, K, NORM).to(DT)
        xe, xo = tl.split(tl.reshape(x, (KSPLIT, HG, 2)))
        lo, hi = _u4_to_dot(p, DT, ASM)
        be = tl.broadcast_to(xe[:, :, None], (KSPLIT, HG, COLS))
        bo = tl.broadcast_to(xo[:, :, None], (KSPLIT, HG, COLS))
        if DT == tl.float32:
            d = tl.dot(hi, bo, tl.dot(lo, be, input_precision="ieee"), input_precision="ieee")
        else:
            d = tl.dot(hi, bo, tl.dot(lo, be))
        m2 = mg[:, None] & mrow[None, :]
        s = tl.load(s_ptr + rows[None, :] * NGRP + g[:, None], mask=m2, other=0.0)
        z = tl.load(z_ptr + rows[None, :] * NGRP + g[:, None], mask=m2, other=0.0)
        sx = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)  # [KSPLIT]
        acc += d * s.to(tl.float32)[:, :, None] + (z.to(tl.float32) * sx[:, None])[:, :, None]
    cols = tl.arange(0, COLS)
    return tl.sum(tl.sum(tl.where(cols[None, None, :] == 0, acc, 0.0), axis=2), axis=0)


# ----------------------------------------------------------------------------- GEMV


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, r_ptr, r2_ptr, nw_ptr, nb_ptr, eps,
                part_ptr, count_ptr, N, NSPLIT, OUT_GAP, XSEG,
                K: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
                ACT2: tl.constexpr, GLU: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES2: tl.constexpr,
                NORM: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PDL: tl.constexpr, ASM: tl.constexpr, I4: tl.constexpr,
                KSPLIT: tl.constexpr, PARTS: tl.constexpr):
    """y[row'] = [r[row] +] act(x' . W[row] [+ b[row]]) [+ r2[row]], ``BLOCK_N`` rows a
    program, rounded where the eager model rounds.

    Rows ``>= NSPLIT`` (a program never straddles it) are a second segment: input ``XSEG``
    further on, activation ``ACT2`` (1 = GELU), stored ``OUT_GAP`` further on. GLU: W holds
    2N rows (gate, up), ``y = silu(gate) * up``. ``r`` may be ``y``. NORM (1 = LayerNorm,
    2 = RMSNorm): every program normalises x itself (``nw``/``nb``: [segments, K]). The
    tensor-core path lets the next kernel be placed only after its loop (placed earlier, it
    ran unbalanced: docs/gpu.md). ``PARTS`` > 1: one program a part of the inputs (grid axis
    1) storing float32 partials; the last of a row block to count itself in ``count`` adds
    them in order, resets the counter and finishes the rows.
    """
    MMA: tl.constexpr = FMT == 2 and I4 == 2
    tl.static_assert(PARTS == 1 or (MMA and not GLU), "input parts: tensor-core path, no GLU")
    if not MMA:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mrow = rows < N
    seg2 = (pid * BLOCK_N >= NSPLIT).to(tl.int32)
    xs = x_ptr + seg2 * XSEG
    nws = nw_ptr + seg2 * K
    nbs = nb_ptr + seg2 * K
    if MMA:
        part = 0
        if PARTS > 1:
            part = tl.program_id(1)
        acc = _dot_rows_mma(xs, w_ptr, s_ptr, z_ptr, rows, mrow, nws, nbs, eps, part, K,
                            GROUP, BLOCK_N, KSPLIT, PARTS, PDL, ASM, NORM)
        if not GLU:
            _pdl_start(PDL)
    else:
        acc = _dot_rows(xs, w_ptr, s_ptr, z_ptr, rows, mrow, nws, nbs, eps, K, FMT, GROUP,
                        BLOCK_N, BLOCK_K, PDL, ASM, I4, NORM)
    dt = y_ptr.dtype.element_ty
    if GLU:
        if MMA:
            up = _dot_rows_mma(xs, w_ptr, s_ptr, z_ptr, rows + N, mrow, nws, nbs, eps, 0, K,
                               GROUP, BLOCK_N, KSPLIT, 1, False, ASM, NORM)
            _pdl_start(PDL)
        else:
            up = _dot_rows(xs, w_ptr, s_ptr, z_ptr, rows + N, mrow, nws, nbs, eps, K, FMT,
                           GROUP, BLOCK_N, BLOCK_K, False, ASM, I4, NORM)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=mrow, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + N + rows, mask=mrow, other=0.0).to(tl.float32)
        g = acc.to(dt).to(tl.float32)
        g = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        acc = g * up.to(dt).to(tl.float32)
        _finish(acc, y_ptr, r_ptr, r2_ptr, rows, mrow, seg2, OUT_GAP, HAS_RES, HAS_RES2)
    elif PARTS == 1:
        acc = _bias_act(acc, b_ptr, rows, mrow, seg2, dt, HAS_BIAS, ACT2)
        _finish(acc, y_ptr, r_ptr, r2_ptr, rows, mrow, seg2, OUT_GAP, HAS_RES, HAS_RES2)
    else:
        tl.store(part_ptr + part * N + rows, acc, mask=mrow)  # PARTS > 1: MMA, set above
        tl.debug_barrier()  # every thread's partials stored before the count (release)
        seen = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if seen == PARTS - 1:
            tot = tl.zeros((BLOCK_N,), tl.float32)
            for j in tl.static_range(PARTS):  # .cg: read from L2, where the parts meet
                tot += tl.load(part_ptr + j * N + rows, mask=mrow, other=0.0,
                               cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)
            tot = _bias_act(tot, b_ptr, rows, mrow, seg2, dt, HAS_BIAS, ACT2)
            _finish(tot, y_ptr, r_ptr, r2_ptr, rows, mrow, seg2, OUT_GAP, HAS_RES, HAS_RES2)


@triton.jit
def _bias_act(acc, b_ptr, rows, mrow, seg2, dt: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACT2: tl.constexpr):
    """acc (+ bias), then the second segment's activation (rounded first, as eager)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=mrow, other=0.0).to(tl.float32)
    if ACT2 == 1:
        acc = tl.where(seg2 != 0, _gelu(acc.to(dt).to(tl.float32)), acc)
    return acc


@triton.jit
def _finish(acc, y_ptr, r_ptr, r2_ptr, rows, mrow, seg2, OUT_GAP, HAS_RES: tl.constexpr,
            HAS_RES2: tl.constexpr):
    """y = [r +] acc [+ r2], rounded to the model dtype after each add, stored."""
    dt = y_ptr.dtype.element_ty
    if HAS_RES:
        r = tl.load(r_ptr + rows, mask=mrow, other=0.0).to(tl.float32)
        acc = r + acc.to(dt).to(tl.float32)
    if HAS_RES2:
        r2 = tl.load(r2_ptr + rows, mask=mrow, other=0.0).to(tl.float32)
        acc = acc.to(dt).to(tl.float32) + r2
    tl.store(y_ptr + rows + seg2 * OUT_GAP, acc.to(dt), mask=mrow)


# ----------------------------------------------------------------------------- rotary + cache


@triton.jit
def rope_write_kernel(qkv_ptr, q_ptr, cs_ptr, slot_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr,
                      layer, SLOTS, t_ptr, cpos_ptr, score_ptr, HQ: tl.constexpr,
                      HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                      HAS_SINK: tl.constexpr, KV_INT8: tl.constexpr, BLOCK_D: tl.constexpr,
                      PDL: tl.constexpr, SCORED: tl.constexpr = 0):
    """Rotate the new token's queries (``q[0]``; with sinks also ``q[1]``, at the sink
    position) and keys, and store its key/value in ``slot`` of ``layer`` (int8: codes and a
    scale a head, as ``cache.storage.quantize_int8``). ``cs``: float32 (window, sink) x (cos,
    sin). ``SCORED``: key head h goes to ``slot[layer, h]``, position t, score 0.
    """
    _pdl_start(PDL)
    _pdl_wait(PDL)
    p = tl.program_id(0)
    rd = tl.arange(0, BLOCK_D)
    md = rd < D
    first = rd < HALF
    rot = rd < 2 * HALF
    partner = tl.where(first, rd + HALF, rd - HALF)
    ci = tl.where(first, rd, rd - HALF)
    sign = tl.where(first, -1.0, 1.0)
    x = tl.load(qkv_ptr + p * D + rd, mask=md, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    xp = tl.load(qkv_ptr + p * D + partner, mask=rot, other=0.0).to(tl.float32)
    c = tl.load(cs_ptr + ci, mask=rot, other=1.0)
    s = tl.load(cs_ptr + HALF + ci, mask=rot, other=0.0)
    out = tl.where(rot, xf * c + sign * xp * s, xf).to(dt)
    if p < HQ:
        tl.store(q_ptr + p * D + rd, out, mask=md)
        if HAS_SINK:
            c2 = tl.load(cs_ptr + 2 * HALF + ci, mask=rot, other=1.0)
            s2 = tl.load(cs_ptr + 3 * HALF + ci, mask=rot, other=0.0)
            tl.store(q_ptr + HQ * D + p * D + rd,
                     tl.where(rot, xf * c2 + sign * xp * s2, xf).to(dt), mask=md)
    elif p < HQ + HKV:
        h = p - HQ
        if SCORED:
            slot = tl.load(slot_ptr + layer * HKV + h)
            row = (layer * HKV + h) * SLOTS
            tl.store(cpos_ptr + row + slot, tl.load(t_ptr))
            tl.store(score_ptr + row + slot, 0.0)
        else:
            slot = tl.load(slot_ptr)
        base = ((layer * HKV + h) * SLOTS + slot) * D
        vv = tl.load(qkv_ptr + (p + HKV) * D + rd, mask=md, other=0.0)
        if KV_INT8:
            kf = out.to(tl.float32)
            vf = vv.to(tl.float32)
            ksc = tl.maximum(tl.max(tl.abs(kf), axis=0), 1e-8) / 127.0
            vsc = tl.maximum(tl.max(tl.abs(vf), axis=0), 1e-8) / 127.0
            kq = tl.minimum(tl.maximum(_round(kf / ksc), -127.0), 127.0)
            vq = tl.minimum(tl.maximum(_round(vf / vsc), -127.0), 127.0)
            tl.store(k_ptr + base + rd, kq.to(tl.int8), mask=md)
            tl.store(v_ptr + base + rd, vq.to(tl.int8), mask=md)
            tl.store(ks_ptr + (layer * HKV + h) * SLOTS + slot, ksc)
            tl.store(vs_ptr + (layer * HKV + h) * SLOTS + slot, vsc)
        else:
            tl.store(k_ptr + base + rd, out, mask=md)
            tl.store(v_ptr + base + rd, vv, mask=md)


@triton.jit
def cos_sin_kernel(pos_ptr, spos_ptr, freq_ptr, cs_ptr, HALF: tl.constexpr,
                   DT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """cs = [cos, sin] at the text position, then at the sink position, float32 [2, 2,
    HALF], once per step for every layer (see :func:`_cos_sin`)."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    _cos_sin(tl.load(pos_ptr), tl.load(spos_ptr), freq_ptr, cs_ptr, HALF, DT, BLOCK)


@triton.jit
def _cos_sin(pos, spos, freq_ptr, cs_ptr, HALF: tl.constexpr, DT: tl.constexpr,
             BLOCK: tl.constexpr):
    """cs = [cos, sin] at ``pos``, then at ``spos``, as :func:`fastdecode.rope.cos_sin`."""
    r = tl.arange(0, BLOCK)
    m = r < HALF
    f = tl.load(freq_ptr + r, mask=m, other=0.0)
    for i in range(2):
        p = pos if i == 0 else spos
        a = p.to(tl.float64) * f
        tl.store(cs_ptr + 2 * i * HALF + r, tl.cos(a).to(tl.float32).to(DT).to(tl.float32),
                 mask=m)
        tl.store(cs_ptr + (2 * i + 1) * HALF + r,
                 tl.sin(a).to(tl.float32).to(DT).to(tl.float32), mask=m)


@triton.jit
def decode_plan_kernel(pos_ptr, freq_ptr, cs_ptr, mask_ptr, slot_ptr, SLOTS, W, R, OFFSET,
                       S: tl.constexpr, CACHE_MODE: tl.constexpr, HALF: tl.constexpr,
                       DT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    """One decode step's plan as ``KVCache.plan_decode`` computes it, in one launch
    (``BLOCK`` slots a program): ``mask`` int8 [SLOTS] (the visible slots), and in program 0
    ``slot`` (where token t goes) and ``cs`` (cos/sin at t and at the sinks' query position,
    + OFFSET); sinks S, window W, ring W + R.
    """
    _pdl_start(PDL)
    _pdl_wait(PDL)
    t = tl.load(pos_ptr)
    C = W + R
    m = tl.maximum(t - S, 0)
    held = tl.where(m <= W, m, W + (tl.maximum(m - W, 0) % R))
    lo = t - held
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # BLOCK slots a program
    d = (t - s) % C  # t - S - r with r = s - S; C-semantics remainder, made >= 0
    d = tl.where(d < 0, d + C, d)
    ring_j = t - d
    j = tl.where(s < S, tl.where(s <= t, s, -1), tl.where(ring_j >= S, ring_j, -1))
    vis = (j >= 0) & (j <= t) & ((j < S) | (j >= lo))
    tl.store(mask_ptr + s, vis.to(tl.int8), mask=s < SLOTS)
    if tl.program_id(0) == 0:
        tl.store(slot_ptr, tl.where(t < S, t, S + tl.maximum(t - S, 0) % C))
        spos = t  # no sinks: the text position again (as plan_decode's q_pos_sink None)
        if CACHE_MODE and S > 0:
            spos = tl.minimum(t, S) + held
        _cos_sin(t + OFFSET, spos + OFFSET, freq_ptr, cs_ptr, HALF, DT, BLOCK_H)


@triton.jit
def _round(x):
    """Round half to even (torch.round), for float32 |x| < 2**22."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


# ----------------------------------------------------------------------------- attention


@triton.jit
def attn_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
                      layer, SLOTS, NSPLIT, PER, scale, t_ptr, cpos_ptr, newer_ptr, free_ptr,
                      logit_ptr, freq_ptr,
                      HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      D0: tl.constexpr, D1: tl.constexpr, S: tl.constexpr,
                      KV_INT8: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                      SCORED: tl.constexpr = 0, CACHE_MODE: tl.constexpr = 0,
                      HALF: tl.constexpr = 1):
    """Partial softmax attention of query head h over slots [sp*PER, sp*PER + PER): the
    running max, sum of exp and unnormalised output. The head dim is read as D0 + D1 (80 =
    64 + 16); sinks (slots < S) are scored with ``q[1, h]``. ``SCORED``: visibility from
    ``cpos >= 0``, the logits kept in ``logit``; ``CACHE_MODE``: the query rotated back by
    each key's rank offset instead of re-rotating the key (:func:`_rot_dot`).
    """
    _pdl_start(PDL)
    _pdl_wait(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    hk = h // (HQ // HKV)
    base = (layer * HKV + hk) * SLOTS
    q0 = tl.load(q_ptr + h * D + tl.arange(0, D0)).to(tl.float32)
    r1 = D0 + tl.arange(0, D1)
    q1 = tl.load(q_ptr + h * D + r1, mask=r1 < D, other=0.0).to(tl.float32)
    if CACHE_MODE:  # the query at the partner dims of the rotation
        r0 = tl.arange(0, D0)
        qp0 = tl.load(q_ptr + h * D + _partner(r0, HALF), mask=r0 < 2 * HALF,
                      other=0.0).to(tl.float32)
        qp1 = tl.load(q_ptr + h * D + _partner(r1, HALF), mask=(r1 < 2 * HALF) & (r1 < D),
                      other=0.0).to(tl.float32)
        t = tl.load(t_ptr)
        slot = tl.load(free_ptr + layer * HKV + hk)
    m_i = tl.full((), -1e30, tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc0 = tl.zeros((D0,), tl.float32)
    acc1 = tl.zeros((D1,), tl.float32)
    start = sp * PER
    for n0 in range(0, PER, BLOCK_N):
        rn = start + n0 + tl.arange(0, BLOCK_N)
        mn = (rn < SLOTS) & (rn < start + PER)
        # every load of the block first (keys, values, mask, scales), then the arithmetic:
        # the values do not depend on the scores, so both streams are in flight together
        kp = k_ptr + (base + rn)[:, None] * D
        vp = v_ptr + (base + rn)[:, None] * D
        k0 = tl.load(kp + tl.arange(0, D0)[None, :], mask=mn[:, None], other=0.0)
        v0 = tl.load(vp + tl.arange(0, D0)[None, :], mask=mn[:, None], other=0.0)
        m1 = mn[:, None] & (r1 < D)[None, :]
        k1 = tl.load(kp + r1[None, :], mask=m1, other=0.0)
        v1 = tl.load(vp + r1[None, :], mask=m1, other=0.0)
        if SCORED:
            hp = tl.load(cpos_ptr + base + rn, mask=mn, other=-1)
            vis = (hp >= 0) & mn
        else:
            vis = (tl.load(mask_ptr + rn, mask=mn, other=0) != 0) & mn
        k0 = k0.to(tl.float32)
        k1 = k1.to(tl.float32)
        if CACHE_MODE:
            nw = tl.load(newer_ptr + base + rn, mask=mn, other=0)
            nw = tl.where(rn == slot, 0, nw + vis.to(nw.dtype))
            dl = (t - nw - hp).to(tl.float64)  # the target position minus the text one
            sc = (_rot_dot(q0, qp0, tl.arange(0, D0), dl, k0, freq_ptr, HALF)
                  + _rot_dot(q1, qp1, r1, dl, k1, freq_ptr, HALF))
        else:
            sc = tl.sum(k0 * q0[None, :], axis=1) + tl.sum(k1 * q1[None, :], axis=1)
        if S > 0:
            if start + n0 < S:
                qs0 = tl.load(q_ptr + (HQ + h) * D + tl.arange(0, D0)).to(tl.float32)
                qs1 = tl.load(q_ptr + (HQ + h) * D + r1, mask=r1 < D, other=0.0).to(tl.float32)
                ss = tl.sum(k0 * qs0[None, :], axis=1) + tl.sum(k1 * qs1[None, :], axis=1)
                sc = tl.where(rn < S, ss, sc)
        if KV_INT8:
            sc = sc * tl.load(ks_ptr + base + rn, mask=mn, other=0.0)
        sc = tl.where(vis, sc * scale, float("-inf"))
        if SCORED:
            tl.store(logit_ptr + h * SLOTS + rn, sc, mask=mn)
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if KV_INT8:
            p = p * tl.load(vs_ptr + base + rn, mask=mn, other=0.0)
        acc0 = acc0 * alpha + tl.sum(p[:, None] * v0.to(tl.float32), axis=0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1.to(tl.float32), axis=0)
        m_i = m_new
    o = h * NSPLIT + sp
    tl.store(m_ptr + o, m_i)
    tl.store(l_ptr + o, l_i)
    tl.store(acc_ptr + o * D + tl.arange(0, D0), acc0)
    tl.store(acc_ptr + o * D + r1, acc1, mask=r1 < D)


@triton.jit
def _partner(r, HALF: tl.constexpr):
    """The rotate-half partner of dim r (r +- HALF; dims >= 2 HALF are not rotated)."""
    return tl.where(r < HALF, r + HALF, r - HALF)


@triton.jit
def _rot_dot(q, qp, r, dl, k, freq_ptr, HALF: tl.constexpr):
    """q . R(dl) k = (R(-dl) q) . k for keys ``k`` [BLOCK_N, len(r)] over dims ``r``
    (``qp``: q at the partner dims), angles in float64 as ``ScoredCache._rotate``."""
    rot = r < 2 * HALF
    f = tl.load(freq_ptr + tl.where(r < HALF, r, r - HALF), mask=rot, other=0.0)
    a = dl[:, None] * f.to(tl.float64)[None, :]
    c = tl.cos(a).to(tl.float32)
    s = tl.sin(a).to(tl.float32)
    sign = tl.where(r < HALF, -1.0, 1.0)
    qr = tl.where(rot[None, :], q[None, :] * c - (sign * qp)[None, :] * s, q[None, :])
    return tl.sum(qr * k, axis=1)


@triton.jit
def _combine_head(m_ptr, l_ptr, acc_ptr, o_ptr, h, NSPLIT, D: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    rs = tl.arange(0, BLOCK_S)
    ms = rs < NSPLIT
    rd = tl.arange(0, BLOCK_D)
    md = rd < D
    m = tl.load(m_ptr + h * NSPLIT + rs, mask=ms, other=-1e30)
    l_ = tl.load(l_ptr + h * NSPLIT + rs, mask=ms, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(acc_ptr + (h * NSPLIT + rs)[:, None] * D + rd[None, :],
                  mask=ms[:, None] & md[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_, axis=0)
    tl.store(o_ptr + h * D + rd, o.to(o_ptr.dtype.element_ty), mask=md)


@triton.jit
def attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, NSPLIT, D: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """o[h] = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max m): the softmax
    over all slots from the partials, rounded once to the model dtype."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    _combine_head(m_ptr, l_ptr, acc_ptr, o_ptr, tl.program_id(0), NSPLIT, D, BLOCK_S, BLOCK_D)


# ----------------------------------------------------------------------------- greedy


@triton.jit
def argmax_kernel(x_ptr, tok_ptr, pos_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """tok = argmax(x) (the first index of the maximum, as torch.argmax), pos += 1, in one
    program: each lane keeps its best (value, first index), reduced once at the end."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    r = tl.arange(0, BLOCK)
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = r  # (all -inf: index 0, as torch)
    for n0 in range(0, N, BLOCK):
        x = tl.load(x_ptr + n0 + r, mask=n0 + r < N, other=float("-inf")).to(tl.float32)
        take = x > best_v  # strict: a lane keeps its first index of a value
        best_v = tl.where(take, x, best_v)
        best_i = tl.where(take, n0 + r, best_i)
    v = tl.max(best_v, axis=0)
    i = tl.min(tl.where(best_v == v, best_i, 2147483647), axis=0)
    tl.store(tok_ptr, i.to(tl.int64))
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
