"""Launching the fused kernels: a GEMV's launch from the card's table (:mod:`.table`), else
:func:`heuristic`, never timed (docs/gpu.md, "H200: launches from a table").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.layout import FLOAT, INT4, INT8, Packed
from . import kernels, table
from .options import MIN_PER, PARTS, FusedOptions

_CHOSEN: dict[tuple, tuple] = {}  # launch key -> configuration (a cache: no lookup per launch)
_RECORD: dict[str, dict] = {}  # what chosen() reports
_HAS_PDL: dict[int, bool] = {}  # device index -> compute capability >= 9 (asked once)


def pdl(x: torch.Tensor, opts: FusedOptions) -> bool:
    """Launch with programmatic dependent launch: on, on CUDA devices that have it."""
    if not (opts.pdl and x.is_cuda):
        return False
    i = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if i not in _HAS_PDL:
        _HAS_PDL[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _HAS_PDL[i]


def _launch_opts(x: torch.Tensor, opts: FusedOptions) -> dict:
    on = pdl(x, opts)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


# What the sweep (scripts/gpu_gemv_sweep.py) times for each shape, (BLOCK_N, BLOCK_K,
# num_warps, num_stages or None): 2,048 to 16,384 weights a program an iteration.
SWEEP_CANDIDATES = sorted(
    {(bn, bk, w, None) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096)
     for w in (4, 8) if 2048 <= bn * bk <= 16384 and (w == 4 or bn * bk >= 4096)
     and (w == 8 or bn * bk <= 8192)} | {(8, 256, 4, None), (16, 256, 4, None)})
# int4 on tensor cores (path 2): (BLOCK_N, K splits = num_warps, num_stages), whole or cut
# into input parts (experiments/results/h100-gemv-sweep-int4-mma-e22100d.json,
# perf/results/h100-gemv-sweep-int4-parts-871e4c3.json)
SWEEP_MMA = [(16, 4, 3), (16, 8, 3), (16, 4, 4), (16, 8, 2)]
SWEEP_MMA_PARTS = [(16, 4, 3), (16, 8, 3)]
# The attention launch (slots per split, BLOCK_N, num_warps), fixed: timed alone the
# launches rank differently than inside the graphed step (perf/results/h100-attn-ab-preload.json)
ATTN = (64, 16, 1)


def chosen() -> dict:
    """What this process launched and why: per GEMV shape (table.shape_key) the
    configuration and its source (a table's class, 'heuristic' or 'interpreter')."""
    return {k: dict(v) for k, v in sorted(_RECORD.items())}


def _note(key: str, cfg: tuple, source: str, dev: table.Device | None, t=None) -> None:
    _RECORD[key] = {"cfg": list(cfg), "from": source,
                    "device": f"{dev.name} sm{dev.capability[0]}{dev.capability[1]}"
                    if dev else "cpu", **({"table": t.path.rsplit("/", 1)[-1]} if t else {})}


def _pow2_divisor(n: int, limit: int) -> int:
    b = 1
    while b * 2 <= limit and n % (b * 2) == 0:
        b *= 2
    return b


def _valid(cfg, p: Packed, n: int, nsplit: int) -> bool:
    bn, bk = cfg[:2]
    if 0 < nsplit < n and nsplit % bn:
        return False
    if p.fmt == INT8 and p.group % bk:
        return False
    if p.fmt == INT4 and (bk % p.group or bk > 2048):
        return False
    return True


def _mma_ok(p: Packed, n: int, nsplit: int, dtype: torch.dtype, opts: FusedOptions) -> bool:
    """int4 on tensor cores: groups of >= 32, 16-row blocks in each segment, bf16/fp16 x."""
    return (p.fmt == INT4 and p.group >= 32 and not (0 < nsplit < n and nsplit % 16)
            and (dtype in (torch.bfloat16, torch.float16) or opts.int4 == 2))


def _asm(applies: bool, opts: FusedOptions) -> bool:
    """Inline-PTX conversions wherever they apply unless pinned: the faster in the graphed
    step (perf/results/h100-fused-ab-asm-c0d3167.json)."""
    return applies and opts.asm is not False


def int4_paths(p: Packed, n: int, nsplit: int, dtype: torch.dtype,
               opts: FusedOptions) -> tuple[int, ...]:
    """The int4 path: as pinned, else tensor cores for groups of 128 or more where they
    apply, path 1 otherwise (docs/gpu.md)."""
    if p.fmt != INT4:
        return (0,)
    mma = _mma_ok(p, n, nsplit, dtype, opts)
    if opts.int4 is not None:
        return (opts.int4,) if opts.int4 != 2 or mma else (1,)
    return (2,) if mma and p.group >= 128 else (1,)


MIN_PROGRAMS_PER_SM = 3


def parts(n: int, block_n: int, sms: int, opts: FusedOptions) -> int:
    """Input parts of a tensor-core GEMV: as pinned, else the fewest giving
    MIN_PROGRAMS_PER_SM programs an SM (perf/results/h100-gemv-sweep-int4-parts-871e4c3.json)."""
    if opts.parts is not None:
        return opts.parts
    blocks = triton.cdiv(n, block_n)
    for k in PARTS:
        if blocks * k >= MIN_PROGRAMS_PER_SM * sms:
            return k
    return PARTS[-1]


class Workspace:
    """Scratch of the GEMVs cut into input parts, one per stream: float32 partial sums and
    an int32 counter a row block, zero between launches (the last program resets it)."""

    def __init__(self, rows: int, device, min_block: int = 16):
        self.rows = rows
        self.parts = torch.empty(PARTS[-1] * rows, dtype=torch.float32, device=device)
        self.counts = torch.zeros(triton.cdiv(rows, min_block), dtype=torch.int32,
                                  device=device)

    def fits(self, n: int, k: int, block_n: int) -> bool:
        return n <= self.rows and k <= PARTS[-1] and triton.cdiv(n, block_n) <= \
            self.counts.numel()


def _can_cut(n: int, k: int, bn: int, glu: bool, ws: Workspace | None) -> bool:
    return k == 1 or (not glu and ws is not None and ws.fits(n, k, bn))


def admissible(cfg: tuple, p: Packed, n: int, nsplit: int, dtype: torch.dtype,
               opts: FusedOptions, glu: bool = False, ws: Workspace | None = None) -> bool:
    """Whether ``cfg`` may run this launch under these options (int4 path, inline PTX,
    block sizes the format and segments allow, parts only where a workspace fits)."""
    bn, bk, warps, stages, asm, path, k = cfg
    if path != int4_paths(p, n, nsplit, dtype, opts)[0] or asm != _asm(p.fmt != FLOAT, opts):
        return False
    if path == 2:
        return (bk == p.group and bn % 16 == 0 and not (0 < nsplit < n and nsplit % bn)
                and _can_cut(n, k, bn, glu, ws)
                and (opts.parts in (None, k) or not _can_cut(n, opts.parts, bn, glu, ws)))
    return k == 1 and _valid(cfg, p, n, nsplit)


def heuristic(p: Packed, n: int, nsplit: int, dtype: torch.dtype, opts: FusedOptions,
              glu: bool = False, ws: Workspace | None = None, sms: int = 132,
              norm: int = 0) -> tuple:
    """A launch for a shape or card no table holds: the H100/H200 sweeps' near-best
    configurations by format and input length, fitted to the shape (docs/gpu.md)."""
    path = int4_paths(p, n, nsplit, dtype, opts)[0]
    asm = _asm(p.fmt != FLOAT, opts)
    if path == 2:
        k = parts(n, 16, sms, opts)
        k = k if _can_cut(n, k, 16, glu, ws) else 1
        return 16, p.group, 4 if k > 1 or p.k < 8192 else 8, 3, asm, 2, k
    long_k = p.k >= 8192
    if p.fmt == FLOAT:
        bn, bk, w = (8, 512, 8) if norm else (2, 1024, 4)
    elif p.fmt == INT8:
        bn, bk, w = (2, 2048, 4) if long_k else (8, 512, 8)
    else:
        bn, bk, w = (8, 1024, 8) if long_k else (8, 512, 8)
    bk = min(bk, max(triton.next_power_of_2(p.k), 16))
    if 0 < nsplit < n:
        bn = _pow2_divisor(nsplit, bn)
    if p.fmt == INT8:
        bk = _pow2_divisor(p.group, bk)
    elif p.fmt == INT4:
        bk = p.group * max(1, min(bk, 2048) // p.group)
    return bn, bk, w, None, asm, path, 1


def candidates(p: Packed, n: int, nsplit: int, dtype: torch.dtype, opts: FusedOptions,
               glu: bool = False, ws: Workspace | None = None,
               parts_: tuple[int, ...] = (1,)) -> list[tuple]:
    """The admissible configurations the sweep times (input parts ``parts_`` on path 2)."""
    path = int4_paths(p, n, nsplit, dtype, opts)[0]
    asm = _asm(p.fmt != FLOAT, opts)
    if path == 2:
        cfgs = [(bn, p.group, w, st, asm, 2, k) for k in parts_
                for bn, w, st in (SWEEP_MMA if k == 1 else SWEEP_MMA_PARTS)]
    else:
        cfgs = [c + (asm, path, 1) for c in SWEEP_CANDIDATES]
    return [c for c in cfgs if admissible(c, p, n, nsplit, dtype, opts, glu, ws)]


def choose(p: Packed, n: int, nsplit: int, dtype: torch.dtype, opts: FusedOptions,
           dev: table.Device, glu: bool = False, ws: Workspace | None = None,
           norm: int = 0) -> tuple[tuple, str, table.Table | None]:
    """(configuration, source, table) for a GEMV on ``dev``: the card's table entry where
    admissible (``opts.tune`` False: never), else :func:`heuristic`."""
    t = table.for_device(dev, opts.launch_table) if opts.tune else None
    cfg = t.gemv.get(table.shape_key(p, n, dtype, norm, glu)) if t is not None else None
    if cfg is not None and admissible(cfg, p, n, nsplit, dtype, opts, glu, ws):
        return cfg, t.name, t
    return heuristic(p, n, nsplit, dtype, opts, glu, ws, dev.sms, norm), "heuristic", None


def _interp_gemv(p: Packed, n: int, nsplit: int, dtype: torch.dtype, glu: bool,
                 ws: Workspace | None, opts: FusedOptions) -> tuple:
    """Under the interpreter (the CPU tests): small blocks, so that the tiny models' GEMVs
    still take every code path (several row blocks, K chunks, input parts)."""
    path = int4_paths(p, n, nsplit, dtype, opts)[0]
    if path == 2:
        k = opts.parts or 2
        k = k if not glu and ws is not None and ws.fits(n, k, 16) else 1
        return 16, p.group, 2, None, False, 2, k
    bn = 16 if not 0 < nsplit < n else _pow2_divisor(nsplit, 16)
    if p.fmt == INT4:
        bk = p.group
    elif p.fmt == INT8:
        bk = _pow2_divisor(p.group, 32)
    else:
        bk = 32
    return bn, bk, 1, None, False, path, 1


def gemv(x, p: Packed, y, res, *, n, nsplit, opts: FusedOptions, gap=0, xseg=0, act2=0,
         glu=False, norm=None, res2=None, ws: Workspace | None = None) -> None:
    """y (= res +) act(x . W^T + b) (+ res2) over ``n`` rows; ``norm`` = (kind, weight,
    bias, eps) normalises x in the kernel; ``ws`` lets a tensor-core GEMV be cut in parts."""
    dummy = p.w
    kind, nw, nb, eps = norm if norm is not None else (0, x, None, 0.0)
    args = (x, p.w, p.s if p.s is not None else dummy, p.z if p.z is not None else dummy,
            p.bias if p.bias is not None else dummy, y, res if res is not None else y,
            res2 if res2 is not None else y, nw, nb if nb is not None else nw, eps, n, nsplit,
            gap, xseg)
    meta = dict(K=p.k, FMT=p.fmt, GROUP=p.group, ACT2=act2, GLU=glu,
                HAS_BIAS=p.bias is not None, HAS_RES=res is not None,
                HAS_RES2=res2 is not None, NORM=kind,
                **_launch_opts(x, opts))
    key = ("gemv", x.device, n, p.k, nsplit, p.fmt, p.group, kind, int(glu), x.dtype, opts,
           ws is not None and ws.rows)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        skey = table.shape_key(p, n, x.dtype, kind, glu)
        if x.is_cuda:
            dev = table.Device.of(x.device.index if x.device.index is not None
                                  else torch.cuda.current_device())
            cfg, source, t = choose(p, n, nsplit, x.dtype, opts, dev, glu, ws, kind)
            _note(skey, cfg, source, dev, t)
        else:
            cfg = _interp_gemv(p, n, nsplit, x.dtype, glu, ws, opts)
            _note(skey, cfg, "interpreter", None)
        _CHOSEN[key] = cfg
    launch_gemv(args, meta, n, cfg, ws)


def launch_gemv(args: tuple, meta: dict, n: int, cfg: tuple, ws: Workspace | None = None):
    """One launch of kernels.gemv_kernel with ``cfg`` (``args`` without the workspace's)."""
    bn, bk, warps, stages, asm, path, k = cfg
    extra = {"num_stages": stages} if stages is not None else {}
    if k > 1 and (ws is None or not ws.fits(n, k, bn) or path != 2 or meta["GLU"]):
        raise ValueError(f"a GEMV of {n} rows in {k} parts: tensor-core path, no GLU, and a "
                         "workspace that fits it")
    scratch = (ws.parts, ws.counts) if ws is not None else (args[1], args[1])
    args = args[:11] + scratch + args[11:]
    kernels.gemv_kernel[(triton.cdiv(n, bn), k)](*args, **meta, BLOCK_N=bn, BLOCK_K=bk,
                                                 ASM=asm, I4=path,
                                                 KSPLIT=warps if path == 2 else 1, PARTS=k,
                                                 num_warps=warps, **extra)


def norm(x, nw, nb, out, kind: int, segments: int, eps: float, opts: FusedOptions) -> None:
    """out[s] = norm_s(x) for s < segments (nw, nb: [segments, K]; RMSNorm: nb unused)."""
    k = x.numel()
    # x in one block up to 8,192; the interpreter: blocks of 32 (the chunked path too)
    block = triton.next_power_of_2(k)
    block = (block if block <= 8192 else 1024) if x.is_cuda else min(block, 32)
    warps = (8 if block >= 4096 else 4) if x.is_cuda else 1
    kernels.norm_kernel[(segments,)](x, nw, nb if nb is not None else nw, out, eps, K=k,
                                     NORM=kind, BLOCK_K=block, num_warps=warps,
                                     **_launch_opts(x, opts))


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def cos_sin(pos, spos, freqs, cs, dtype, opts: FusedOptions) -> None:
    """cs (float32 [2, 2, half]) = cos/sin at pos and at spos (see kernels.cos_sin_kernel)."""
    half = freqs.numel()
    kernels.cos_sin_kernel[(1,)](pos, spos, freqs, cs, HALF=half, DT=_TL_DTYPE[dtype],
                                 BLOCK=triton.next_power_of_2(half), num_warps=1,
                                 **_launch_opts(cs, opts))


def decode_plan(pos, cache, freqs, cs, mask, slot, dtype, opts: FusedOptions) -> None:
    """mask/slot/cs for the token at ``pos``: ``cache.plan_decode`` and :func:`cos_sin` in
    one launch."""
    half = freqs.numel()
    block = 256 if pos.is_cuda else 32  # the interpreter: several programs on small caches
    kernels.decode_plan_kernel[(triton.cdiv(cache.slots, block),)](
        pos, freqs, cs, mask, slot, cache.slots, cache.window, cache.compress_every,
        cache.position_offset, S=cache.sink, CACHE_MODE=cache.position_mode == "cache",
        HALF=half, DT=_TL_DTYPE[dtype], BLOCK_H=triton.next_power_of_2(half), BLOCK=block,
        num_warps=2 if pos.is_cuda else 1, **_launch_opts(cs, opts))


def rope_write(buf, q, cs, slot, k, v, ks, vs, layer, slots, hq, hkv, d, half, has_sink,
               kv_int8, opts: FusedOptions, scored=None) -> None:
    """``scored``: a score-based cache's ``scored.ScoredArgs`` (then ``slot`` is its per-head
    ``free``), None for the others."""
    extra = (scored.t, scored.pos, scored.score) if scored is not None else (slot,) * 3
    kernels.rope_write_kernel[(hq + hkv,)](
        buf, q, cs, slot, k, v, ks, vs, layer, slots, *extra, HQ=hq, HKV=hkv, D=d, HALF=half,
        HAS_SINK=has_sink, KV_INT8=kv_int8, BLOCK_D=triton.next_power_of_2(d),
        num_warps=1, SCORED=int(scored is not None), **_launch_opts(buf, opts))


def argmax(x, tok, pos, opts: FusedOptions) -> None:
    """tok = argmax(x), pos += 1 (see kernels.argmax_kernel)."""
    cuda = x.is_cuda
    kernels.argmax_kernel[(1,)](x, tok, pos, x.numel(), BLOCK=8192 if cuda else 1024,
                                num_warps=16 if cuda else 1, **_launch_opts(x, opts))


def max_splits(slots: int) -> int:
    return triton.cdiv(slots, MIN_PER)


def attention(q, k, v, ks, vs, mask, m, l_, acc, out, layer, slots, hq, hkv, d, d0, d1,
              sink, kv_int8, scale, opts: FusedOptions, scored=None) -> None:
    """``scored``: a score-based cache's ``ScoredArgs`` (the scored combine updates scores
    and evicts)."""
    launch = _launch_opts(q, opts)

    def run(cfg, sc=None):
        per, bn, warps = cfg
        nsplit = triton.cdiv(slots, per)
        extra = ((sc.t, sc.pos, sc.newer, sc.free, sc.logit, sc.freqs) if sc is not None
                 else (m,) * 6)
        kernels.attn_split_kernel[(hq, nsplit)](
            q, k, v, ks, vs, mask, m, l_, acc, layer, slots, nsplit, per,
            scale, *extra, HQ=hq, HKV=hkv, D=d, D0=d0, D1=d1, S=sink, KV_INT8=kv_int8,
            BLOCK_N=bn, num_warps=warps, **(sc.flags() if sc is not None else {}),
            **launch)
        common = dict(D=d, BLOCK_S=triton.next_power_of_2(nsplit),
                      BLOCK_D=triton.next_power_of_2(d))
        if sc is None:
            kernels.attn_combine_kernel[(hq,)](m, l_, acc, out, nsplit, **common,
                                               num_warps=1 if nsplit <= 32 else 4, **launch)
            return
        sc.combine(m, l_, acc, out, layer, nsplit, slots, hq, hkv, common, launch,
                   q.is_cuda)

    if not q.is_cuda:
        run((MIN_PER, 16, 1), scored)
        return
    if opts.attn is None:
        key = ("attn", slots, hq, hkv, d, sink, int(kv_int8), str(q.dtype).removeprefix("torch."))
        if key not in _CHOSEN:  # recorded once: this runs on every launch of an un-graphed step
            _CHOSEN[key] = ATTN
            _RECORD[" ".join(map(str, key))] = {"cfg": list(ATTN), "from": "fixed"}
    run(opts.attn or ATTN, scored)


__all__ = ["gemv", "Workspace", "parts", "choose", "heuristic", "admissible", "candidates",
           "norm", "cos_sin", "decode_plan", "rope_write", "attention", "argmax", "chosen",
           "max_splits"]
