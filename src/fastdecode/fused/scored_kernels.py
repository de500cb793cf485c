"""The fused step's kernels for score-based caches (#20): the scored combine (scores, each
tile's eviction candidate) and the eviction; tests/test_fused_scored.py holds them equal."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _combine_head, _pdl_start, _pdl_wait


@triton.jit
def attn_combine_scored_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, logit_ptr, t_ptr, cpos_ptr,
                               score_ptr, free_ptr, pkey_ptr, pidx_ptr, layer, NSPLIT, SLOTS,
                               SINK, RECENT, NT, HQ: tl.constexpr, HKV: tl.constexpr,
                               D: tl.constexpr, TOVA: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                               PDL: tl.constexpr):
    """A score-based cache's combine (``ScoredCache._observe_decode``), grid (KV head, j):
    j >= NT writes a query head's output, j < NT a tile of slots: the probabilities update
    the scores (H2O: sum, TOVA: mean) and the tile's least evictable (score, position),
    packed in an int64, goes to ``pkey``, its slot and first empty slot to ``pidx``. One
    tile a program (perf/results/h200-h2o-vs-streaming-dd723c6.json)."""
    _pdl_start(PDL)
    hk = tl.program_id(0)
    j = tl.program_id(1)
    G: tl.constexpr = HQ // HKV
    row = (layer * HKV + hk) * SLOTS
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < SLOTS  # none for the output programs
    # before the wait, hidden under the split kernel: positions and scores, which this
    # step changed only in the new slot (rope_write: pos t, score 0, patched in here); the
    # last step (its evict wrote free) ended before this one's first launch
    t = tl.load(t_ptr)
    slot = tl.load(free_ptr + layer * HKV + hk)
    p = tl.where(rn == slot, t, tl.load(cpos_ptr + row + rn, mask=mn, other=-1))
    old = tl.where(rn == slot, 0.0, tl.load(score_ptr + row + rn, mask=mn, other=0.0))
    _pdl_wait(PDL)
    if j >= NT:
        _combine_head(m_ptr, l_ptr, acc_ptr, o_ptr, hk * G + j - NT, NSPLIT, D, BLOCK_S,
                      BLOCK_D)
    else:
        rh = tl.arange(0, BLOCK_H)
        mh = rh < (HQ if TOVA else G)
        heads = rh + (0 if TOVA else hk * G)
        rs = tl.arange(0, BLOCK_S)
        mm = mh[:, None] & (rs < NSPLIT)[None, :]
        m = tl.load(m_ptr + heads[:, None] * NSPLIT + rs[None, :], mask=mm, other=-1e30)
        l_ = tl.load(l_ptr + heads[:, None] * NSPLIT + rs[None, :], mask=mm, other=0.0)
        lg = tl.load(logit_ptr + heads[:, None] * SLOTS + rn[None, :],
                     mask=mh[:, None] & mn[None, :], other=float("-inf"))
        mx = tl.max(m, axis=1)
        z = tl.where(mh, tl.sum(tl.exp(m - mx[:, None]) * l_, axis=1), 1.0)
        held = p >= 0
        pr = tl.sum(tl.exp(lg - mx[:, None]) / z[:, None], axis=0)
        new = tl.where(held, pr / HQ if TOVA else old + pr, 0.0)
        tl.store(score_ptr + row + rn, new, mask=mn)
        big = 9223372036854775807
        ev = held & (p >= SINK) & (p <= t - RECENT)
        key = tl.where(ev, (new.to(tl.int32, bitcast=True).to(tl.int64) << 32) | p, big)
        k = tl.min(key, axis=0)
        o = (layer * HKV + hk) * NT + j
        tl.store(pkey_ptr + o + layer * HKV + hk, k)  # pkey: [layers, HKV, NT + 1]
        if j == 0:  # the new token's slot, for the evict launch (which rewrites free)
            tl.store(pkey_ptr + (layer * HKV + hk + 1) * (NT + 1) - 1, slot)
        tl.store(pidx_ptr + 2 * o, tl.min(tl.where(key == k, rn, 2147483647), axis=0))
        tl.store(pidx_ptr + 2 * o + 1, tl.min(tl.where(mn & ~held, rn, 2147483647), axis=0))


@triton.jit
def scored_evict_kernel(pkey_ptr, pidx_ptr, cpos_ptr, newer_ptr, free_ptr, SLOTS, NT,
                        CACHE_MODE: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Every layer's eviction after the last: per (layer, KV head) the least tile key (lowest
    score, then oldest) is evicted when every slot is held, its slot (else the first empty
    one) becomes ``free``; ``CACHE_MODE`` updates ``newer`` as ``ScoredCache`` does."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    r = tl.program_id(0)  # layer * HKV + hk
    rt = tl.arange(0, BLOCK_T)
    mt = rt < NT
    keys = tl.load(pkey_ptr + r * (NT + 1) + rt, mask=mt, other=9223372036854775807)
    idx = tl.load(pidx_ptr + 2 * (r * NT + rt), mask=mt, other=2147483647)
    k = tl.min(keys, axis=0)
    best = tl.min(tl.where(keys == k, idx, 2147483647), axis=0)
    empty = tl.min(tl.load(pidx_ptr + 2 * (r * NT + rt) + 1, mask=mt, other=2147483647), 0)
    full = empty == 2147483647
    if CACHE_MODE:
        best_p = tl.where(full, k - ((k >> 32) << 32), -1)  # the victim's text position
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < SLOTS
        p = tl.load(cpos_ptr + r * SLOTS + rn, mask=mn, other=-1)
        nw = tl.load(newer_ptr + r * SLOTS + rn, mask=mn, other=0)
        held = (p >= 0) | (full & (rn == best))
        nw += held.to(nw.dtype) - ((p >= 0) & (p < best_p)).to(nw.dtype)
        new_slot = tl.load(pkey_ptr + r * (NT + 1) + NT)
        tl.store(newer_ptr + r * SLOTS + rn, tl.where(rn == new_slot, 0, nw), mask=mn)
    if tl.program_id(1) == 0:
        if full:
            tl.store(cpos_ptr + r * SLOTS + best, -1)
        tl.store(free_ptr + r, tl.where(full, best, empty).to(tl.int64))
