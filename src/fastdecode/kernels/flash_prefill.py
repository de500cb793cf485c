"""Flash-style prefill attention over [cache buffer, new chunk] for every cache policy.

:func:`fastdecode.attention.attend` on a prefill plan without the [T, Nk] score matrix: per
(query head, query block) one online softmax over the key blocks the block can see. Key j
is visible to query i iff ``0 <= kj <= ti`` and (``kj < S`` or ``kj >= lo``), from the plan's
``key_pos``, ``q_lo``, ``q_ti``; sink keys are scored by the sink query in the same softmax;
int8 scales apply to scores and probabilities, as in ``attend``. A per-plan block table
skips unseen key blocks. Head dims like 80 split as 64 + 16 (no multiply wasted on
padding); fp32 inputs use IEEE products, what the CPU interpreter (tests) runs. Given the
rotary cos/sin, the kernel rotates the raw queries itself (at the text and the sink
positions) as they are loaded: no rotated copy of q is written
(perf/results/h200-prefill-0e1f695.json: the rotary pass was 9.3 ms of a 16k prefill).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import InputError

# Launch configurations by CUDA capability. sm_90 (H100/H200): the sweep of
# scripts/gpu_prefill.py (perf/results/h200-prefill-0e1f695.json). sm_80 (A100/A800: no
# wgmma/TMA, Triton emits mma.sync) and other GPUs: unmeasured, with fewer stages so the
# shared memory of smaller parts suffices. The interpreter runs every program in numpy, so
# small blocks.
CONFIGS = {
    (9, 0): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (8, 0): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}

_LOG2E = 1.4426950408889634


def head_split(D: int) -> tuple[int, int]:
    """(DA, DB): the head dim as a power-of-two part plus a second power-of-two part >= 16
    (80 = 64 + 16), or (next power of two >= 16, 0) padded with masks."""
    if D >= 16 and D & (D - 1) == 0:
        return D, 0
    a = 1 << (D.bit_length() - 1)
    b = D - a
    if a >= 16 and b >= 16 and b & (b - 1) == 0:
        return a, b
    return max(16, triton.next_power_of_2(D)), 0


def launch_config(device) -> dict:
    """The launch configuration for ``device`` (the interpreter's on the CPU); the dict
    itself, so a sweep may update it in place."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRET_CONFIG
    return CONFIGS.get(torch.cuda.get_device_capability(device), DEFAULT_CONFIG)


@triton.jit
def _load_q(Q, COS, SIN, sq_t, sc_t, rows, rmask, cols, cmask, HALF: tl.constexpr):
    """q's columns ``cols`` of ``rows``; with HALF > 0 the first 2 * HALF dims rotated
    (rotate-half) in float32, as kernels/prefill_rope.py does."""
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(Q + rows[:, None] * sq_t + cols[None, :], mask=m, other=0.0)
    if HALF > 0:
        rot = cols < 2 * HALF
        first = cols < HALF
        partner = tl.where(first, cols + HALF, tl.where(rot, cols - HALF, cols))
        xp = tl.load(Q + rows[:, None] * sq_t + partner[None, :], mask=m,
                     other=0.0).to(tl.float32)
        ci = tl.where(first, cols, cols - HALF)
        cm = rmask[:, None] & rot[None, :]
        c = tl.load(COS + rows[:, None] * sc_t + ci[None, :], mask=cm, other=1.0)
        s = tl.load(SIN + rows[:, None] * sc_t + ci[None, :], mask=cm, other=0.0)
        sign = tl.where(first, -1.0, 1.0)[None, :]
        xf = x.to(tl.float32)
        xr = xf * c.to(tl.float32) + sign * xp * s.to(tl.float32)
        x = tl.where(rot[None, :], xr, xf).to(x.dtype)
    return x


@triton.jit
def _flash_prefill(Q, QS, K, V, KS, VS, KPOS, QLO, QTI, BIDX, BCNT, OUT,
                   COS, SIN, COSS, SINS,
                   T, NK, S, G, n_qb, n_kb,
                   sq_h, sq_t, sqs_h, sqs_t, sk_h, sk_n, sv_h, sv_n, ss_h, so_h, so_t, sc_t,
                   qk_scale,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_SINK: tl.constexpr, INT8: tl.constexpr, PREC: tl.constexpr,
                   HALF: tl.constexpr):
    # Heaviest query blocks (last in the text: most keys) first.
    qb = n_qb - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    cdt = Q.dtype.element_ty

    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    da = tl.arange(0, DA)
    dam = da < D
    # HALF > 0: QS is Q (the raw queries), rotated at the sink positions (COSS, SINS).
    q_a = _load_q(Q + h * sq_h, COS, SIN, sq_t, sc_t, rows, rmask, da, dam, HALF)
    if HAS_SINK:
        qs_a = _load_q(QS + h * sqs_h, COSS, SINS, sqs_t, sc_t, rows, rmask, da, dam, HALF)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        dbm = db < D
        q_b = _load_q(Q + h * sq_h, COS, SIN, sq_t, sc_t, rows, rmask, db, dbm, HALF)
        if HAS_SINK:
            qs_b = _load_q(QS + h * sqs_h, COSS, SINS, sqs_t, sc_t, rows, rmask, db, dbm,
                           HALF)
    lo = tl.load(QLO + rows, mask=rmask, other=0)
    ti = tl.load(QTI + rows, mask=rmask, other=-1)  # padding rows see nothing

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], tl.float32)

    # Phase 0: the key blocks that hold a visible sink (scored with both queries); phase 1:
    # window blocks some of whose keys are hidden (masked); phase 2: blocks every query of
    # this block sees whole (no mask). Unrolled at compile time: no branch in any loop.
    for phase in tl.static_range(3):
        start = 0 if phase == 0 else tl.load(BCNT + 3 * qb + phase - 1)
        stop = tl.load(BCNT + 3 * qb + phase)
        for i in range(start, stop):
            kb = tl.load(BIDX + qb * n_kb + i)
            cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < NK
            kj = tl.load(KPOS + cols, mask=cmask, other=-1)
            k_a = tl.load(K + kvh * sk_h + cols[:, None] * sk_n + da[None, :],
                          mask=cmask[:, None] & dam[None, :], other=0).to(cdt)
            s = tl.dot(q_a, tl.trans(k_a), input_precision=PREC)
            if DB > 0:
                k_b = tl.load(K + kvh * sk_h + cols[:, None] * sk_n + db[None, :],
                              mask=cmask[:, None], other=0).to(cdt)
                s += tl.dot(q_b, tl.trans(k_b), input_precision=PREC)
            if HAS_SINK and phase == 0:
                ss = tl.dot(qs_a, tl.trans(k_a), input_precision=PREC)
                if DB > 0:
                    ss += tl.dot(qs_b, tl.trans(k_b), input_precision=PREC)
                s = tl.where(((kj >= 0) & (kj < S))[None, :], ss, s)
            s = s * qk_scale
            if INT8:
                ks = tl.load(KS + kvh * ss_h + cols, mask=cmask, other=0.0)
                s = s * ks[None, :]
            if phase < 2:
                vis = ((kj[None, :] >= 0) & (kj[None, :] <= ti[:, None])
                       & ((kj[None, :] < S) | (kj[None, :] >= lo[:, None])))
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            if INT8:
                vs = tl.load(VS + kvh * ss_h + cols, mask=cmask, other=0.0)
                p = p * vs[None, :]
            p = p.to(cdt)
            v_a = tl.load(V + kvh * sv_h + cols[:, None] * sv_n + da[None, :],
                          mask=cmask[:, None] & dam[None, :], other=0).to(cdt)
            acc_a = acc_a * alpha[:, None] + tl.dot(p, v_a, input_precision=PREC)
            if DB > 0:
                v_b = tl.load(V + kvh * sv_h + cols[:, None] * sv_n + db[None, :],
                              mask=cmask[:, None], other=0).to(cdt)
                acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b, input_precision=PREC)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out_a = acc_a / l_i[:, None]
    tl.store(OUT + h * so_h + rows[:, None] * so_t + da[None, :], out_a.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & dam[None, :])
    if DB > 0:
        out_b = acc_b / l_i[:, None]
        tl.store(OUT + h * so_h + rows[:, None] * so_t + db[None, :],
                 out_b.to(OUT.dtype.element_ty), mask=rmask[:, None])


def block_table(key_pos: torch.Tensor, q_lo: torch.Tensor, q_ti: torch.Tensor, num_sink: int,
                block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key blocks it may see (int32 [n_qb, n_kb]: visible sinks, window
    blocks seen in part, blocks seen whole and run unmasked, each in index order) and where
    each group ends (int32 [n_qb, 3]); on the device, no host sync."""
    NK, T = key_pos.numel(), q_ti.numel()
    n_kb, n_qb = triton.cdiv(NK, block_n), triton.cdiv(T, block_m)
    big = torch.iinfo(torch.int64).max
    kp = torch.nn.functional.pad(key_pos, (0, n_kb * block_n - NK), value=-1)
    kp = kp.view(n_kb, block_n)
    sink = (kp >= 0) & (kp < num_sink)
    win = kp >= num_sink
    smin = torch.where(sink, kp, big).amin(1)
    wmin = torch.where(win, kp, big).amin(1)
    wmax = torch.where(win, kp, -1).amax(1)
    all_win = win.all(1)
    pad = n_qb * block_m - T
    lo = torch.cat((q_lo, q_lo[-1:].expand(pad))).view(n_qb, block_m)
    ti = torch.cat((q_ti, q_ti[-1:].expand(pad))).view(n_qb, block_m)
    lo_min, lo_max, ti_min, ti_max = lo.amin(1), lo.amax(1), ti.amin(1), ti.amax(1)
    vis_sink = smin[None, :] <= ti_max[:, None]
    vis = vis_sink | ((wmax[None, :] >= lo_min[:, None]) & (wmin[None, :] <= ti_max[:, None]))
    full = (all_win[None, :] & (wmin[None, :] >= lo_max[:, None])
            & (wmax[None, :] <= ti_min[:, None]))
    part = vis & ~vis_sink & ~full
    count = torch.stack((vis_sink.sum(1), (vis_sink | part).sum(1), vis.sum(1)), 1)
    # rank: 0 sink, 1 partial window, 2 whole window, 3 unseen
    rank = torch.full(vis.shape, 3, dtype=torch.uint8, device=vis.device)
    rank = rank.masked_fill(full, 2).masked_fill(part, 1).masked_fill(vis_sink, 0)
    order = torch.argsort(rank, dim=1, stable=True).to(torch.int32)
    return order.contiguous(), count.to(torch.int32).contiguous()


def flash_prefill(q: torch.Tensor, q_sink: torch.Tensor | None, k: torch.Tensor,
                  v: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  key_pos: torch.Tensor, q_lo: torch.Tensor, q_ti: torch.Tensor,
                  num_sink: int, *, memo: dict | None = None,
                  config: dict | None = None, rot=None, rot_sink=None) -> torch.Tensor:
    """``attend``'s prefill: [Hq, T, D] in q's dtype, a transposed view of a [T, Hq, D]
    buffer (the output projection needs no copy). ``memo`` (one per plan) keeps the block
    table for every layer. ``rot`` (cos, sin) [T, rotary_dim // 2]: q is not rotated yet;
    the kernel rotates it at the text positions and, with ``rot_sink``, at the sink
    positions (then ``q_sink`` must be None: the sink queries are q itself)."""
    Hq, T, D = q.shape
    Hkv, NK, Dk = k.shape
    if Dk != D or v.shape != k.shape or Hq % Hkv:
        raise InputError(f"flash_prefill: q {tuple(q.shape)} does not fit k {tuple(k.shape)}"
                         f" / v {tuple(v.shape)}")
    if key_pos.numel() != NK or q_lo.numel() != T or q_ti.numel() != T:
        raise InputError("flash_prefill: positions do not match the keys / queries")
    if rot is not None and q_sink is not None:
        raise InputError("flash_prefill: give raw q with rot/rot_sink, or q and q_sink rotated")
    cfg = dict(launch_config(q.device), **(config or {}))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    key = ("flash_blocks", bm, bn, num_sink)
    table = memo.get(key) if memo is not None else None
    if table is None:
        table = block_table(key_pos, q_lo, q_ti, num_sink, bm, bn)
        if memo is not None:
            memo[key] = table
    bidx, bcnt = table
    if rot is not None:
        q_sink = q if rot_sink is not None else None
        cos, sin = (t.contiguous() for t in rot)
        cos_s, sin_s = (t.contiguous() for t in rot_sink) if rot_sink is not None else (cos, sin)
        half = cos.shape[-1]
    else:
        cos = sin = cos_s = sin_s = key_pos  # unused (HALF = 0)
        half = 0
    has_sink = q_sink is not None and num_sink > 0
    q, qs, k, v = (t if t.stride(-1) == 1 else t.contiguous()
                   for t in (q, q_sink if has_sink else q, k, v))
    int8 = k_scale is not None
    if int8:
        k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()  # one stride for both
    ks, vs = (k_scale, v_scale) if int8 else (k, v)
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    o = out.transpose(0, 1)
    # int8 codes: one padded part (on the H200, the 80 = 64 + 16 split gave NaN with int8
    # loads in a first run; the padded form is the one that was checked there).
    DA, DB = head_split(D) if not int8 else (max(16, triton.next_power_of_2(D)), 0)
    n_qb, n_kb = bidx.shape
    _flash_prefill[(n_qb, Hq)](
        q, qs, k, v, ks, vs, key_pos, q_lo, q_ti, bidx, bcnt, o, cos, sin, cos_s, sin_s,
        T, NK, num_sink, Hq // Hkv, n_qb, n_kb,
        q.stride(0), q.stride(1), qs.stride(0), qs.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), ks.stride(0) if int8 else 0, o.stride(0), o.stride(1),
        cos.stride(0) if half else 0, _LOG2E / math.sqrt(D),
        D=D, DA=DA, DB=DB, BLOCK_M=bm, BLOCK_N=bn, HAS_SINK=has_sink, INT8=int8,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", HALF=half,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o
