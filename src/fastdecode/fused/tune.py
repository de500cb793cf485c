"""Launching the fused kernels, with launch parameters chosen per shape by measurement.

On CUDA the first launch of each distinct GEMV (rows, inputs, format, fusions) and of the
attention for each cache shape times a short list of candidate configurations on the
device (``triton.testing.do_bench``: median, L2 flushed between runs) and keeps the
fastest for the process; :func:`chosen` reports what was picked (benchmark records keep
it). Tuning happens while a step is warmed up, before any CUDA-graph capture. In-place
launches (the residual GEMVs) get their output restored after timing.

Under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) a fixed small
configuration is used, chosen to exercise the same code paths (several row blocks, several
K chunks, several attention splits).

Every launch takes the step's :class:`~fastdecode.fused.options.FusedOptions` (``opts``):
besides block sizes, a GEMV candidate names two code paths of the quantized formats that
the options may pin, ``asm`` and the ``int4`` path, and on the tensor-core path the input
``parts`` (:class:`Workspace`). None of them changes a result beyond accumulation order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant.layout import FLOAT, INT4, INT8, Packed
from . import kernels
from .options import MIN_PER, PARTS, FusedOptions

_CHOSEN: dict[tuple, tuple] = {}


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

# Candidate lists: (BLOCK_N, BLOCK_K, num_warps, num_stages or None); the tuner adds asm /
# int4 path. Every candidate is compiled and timed on first use, so each list holds only
# the configurations that were fastest for some Pythia-2.8B shape inside the graphed step
# (scripts/gpu_gemv_sweep.py; perf/results/h100-gemv-sweep.json,
# h100-gemv-sweep-bf16-9f19846.json, h100-gemv-sweep-int8-mma-5af6f77.json).
GEMV_CANDIDATES = [(2, 1024, 4, None), (4, 1024, 4, None), (8, 256, 4, None),
                   (8, 512, 4, None), (8, 512, 8, None), (8, 1024, 8, None), (16, 256, 4, None),
                   (4, 1024, 4, 1), (2, 2048, 4, None), (4, 2048, 8, None)]
# int8: the graphed sweep's winners only (with more, do_bench's picks varied by process)
INT8_CANDIDATES = [(8, 512, 8, None), (2, 2048, 4, None)]
INT4_CANDIDATES = [(4, 256, 4, None), (8, 256, 4, None), (16, 256, 8, None),
                   (8, 512, 8, None), (4, 1024, 4, None),
                   (8, 1024, 8, None)]  # as GEMV_CANDIDATES; BLOCK_K a multiple of the group
# int4 on tensor cores (path 2): (BLOCK_N, K splits = num_warps, num_stages), the fastest in
# a graph of 32 layers (experiments/results/h100-gemv-sweep-int4-mma-e22100d.json)
INT4_MMA_CANDIDATES = [(16, 4, 3), (16, 8, 3)]
# cut into input parts: 4 warps (perf/results/h100-gemv-sweep-int4-parts-871e4c3.json)
INT4_MMA_PARTS_CANDIDATES = [(16, 4, 3)]
# (slots per split, BLOCK_N, num_warps): one, fixed, since timed alone the attention
# launches rank differently than inside the graphed step (perf/results/
# h100-attn-ab-preload.json, h100-attn-warps-f4c9930.txt)
ATTN_CANDIDATES = [(64, 16, 1)]


def chosen() -> dict[str, str]:
    """What the tuner picked in this process, readable: shape -> configuration."""
    return {" ".join(map(str, k)): " ".join(map(str, v)) for k, v in _CHOSEN.items()}


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
    """int4 on tensor cores: groups of 32 inputs or more (a dot's K is 16 or more), 16-row
    blocks inside each segment, x in a dtype the mma takes (float32 only when pinned)."""
    return (p.fmt == INT4 and p.group >= 32 and not (0 < nsplit < n and nsplit % 16)
            and (dtype in (torch.bfloat16, torch.float16) or opts.int4 == 2))


def _asm(applies: bool, opts: FusedOptions) -> bool:
    """Inline-PTX conversions: on wherever they apply, unless pinned; not timed, since
    inside the graphed step they are the faster everywhere
    (perf/results/h100-fused-ab-asm-c0d3167.json)."""
    return applies and opts.asm is not False


def int4_paths(p: Packed, n: int, nsplit: int, dtype: torch.dtype,
               opts: FusedOptions) -> tuple[int, ...]:
    """The int4 paths to time: as pinned, else tensor cores for groups of 128 or more
    where they apply, path 1 otherwise; not timed, since a launch timed alone ranks them
    differently than the graphed step (docs/gpu.md)."""
    if p.fmt != INT4:
        return (0,)
    mma = _mma_ok(p, n, nsplit, dtype, opts)
    if opts.int4 is not None:
        return (opts.int4,) if opts.int4 != 2 or mma else (1,)
    return (2,) if mma and p.group >= 128 else (1,)


def parts(n: int, block_n: int, device: torch.device, opts: FusedOptions) -> int:
    """How many input parts a tensor-core GEMV of ``n`` rows is cut into (pinned by
    ``opts.parts``): the fewest of :data:`PARTS` that give MIN_PROGRAMS_PER_SM programs an
    SM. These GEMVs are bound by instruction latency and want more warps an SM, but a part
    costs its partial sums (perf/results/h100-gemv-sweep-int4-parts-871e4c3.json)."""
    if opts.parts is not None:
        return opts.parts
    sms = _sm_count(device)
    blocks = triton.cdiv(n, block_n)
    for k in PARTS:
        if blocks * k >= MIN_PROGRAMS_PER_SM * sms:
            return k
    return PARTS[-1]


MIN_PROGRAMS_PER_SM = 3
_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


class Workspace:
    """Scratch of the GEMVs cut into input parts, for one stream (GEMVs of one stream run
    one after the other; those of two streams at once need one each): float32 partial sums
    [PARTS[-1] * rows] and an int32 counter a row block, zero between launches (each
    launch's last program sets its counters back)."""

    def __init__(self, rows: int, device, min_block: int = 16):
        self.rows = rows
        self.parts = torch.empty(PARTS[-1] * rows, dtype=torch.float32, device=device)
        self.counts = torch.zeros(triton.cdiv(rows, min_block), dtype=torch.int32,
                                  device=device)

    def fits(self, n: int, k: int, block_n: int) -> bool:
        return n <= self.rows and k <= PARTS[-1] and triton.cdiv(n, block_n) <= \
            self.counts.numel()


def _parts_choices(n: int, bn: int, glu: bool, ws: Workspace | None,
                   opts: FusedOptions) -> tuple[int, ...]:
    if glu or ws is None:
        return (1,)
    k = parts(n, bn, ws.parts.device, opts)
    return (k,) if ws.fits(n, k, bn) else (1,)


def _gemv_candidates(p: Packed, n: int, nsplit: int, dtype: torch.dtype, opts: FusedOptions,
                     glu: bool = False, ws: Workspace | None = None) -> list[tuple]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, asm, int4 path, parts) for this weight
    (int4 on tensor cores: num_warps is the number of K splits, BLOCK_K the group; parts
    only there, with a workspace)."""
    base = list({FLOAT: GEMV_CANDIDATES, INT8: INT8_CANDIDATES, INT4: INT4_CANDIDATES}[p.fmt])
    valid = [c for c in base if _valid(c, p, n, nsplit)]
    if not valid:  # small or odd widths (SmolLM2's 576): the largest K block that fits
        bn = _pow2_divisor(nsplit, 8) if 0 < nsplit < n else 8
        bk = p.group if p.fmt == INT4 else _pow2_divisor(p.group if p.fmt == INT8 else 256, 256)
        valid = [(bn, bk, 4, None)]
    out = []
    for path in int4_paths(p, n, nsplit, dtype, opts):
        cfgs = ([(bn, p.group, w, st, k) for k in _parts_choices(n, 16, glu, ws, opts)
                 for bn, w, st in (INT4_MMA_CANDIDATES if k == 1 else
                                   INT4_MMA_PARTS_CANDIDATES)] if path == 2
                else [c + (1,) for c in valid])
        out += [c[:4] + (_asm(p.fmt != 0, opts), path, c[4]) for c in cfgs]
    return out


def _interp_gemv(p: Packed, n: int, nsplit: int, dtype: torch.dtype, glu: bool,
                 ws: Workspace | None, opts: FusedOptions) -> tuple:
    """Under the interpreter: small blocks; no inline PTX; the int4 path as pinned (default
    1; tensor cores with two K splits, and the input parts as pinned, else 2 where a
    workspace is given)."""
    path = int4_paths(p, n, nsplit, dtype, opts)[0]
    if path == 2:
        k = opts.parts or 2
        k = k if not glu and ws is not None and ws.fits(n, k, 16) else 1
        return 16, p.group, 2, None, False, 2, k
    bn = 4 if not 0 < nsplit < n else min(4, _pow2_divisor(nsplit, 4))
    if p.fmt == INT4:
        bk = p.group
    elif p.fmt == INT8:
        bk = _pow2_divisor(p.group, 32)
    else:
        bk = 32
    return bn, bk, 1, None, False, path, 1


def _bench(fn, restore: torch.Tensor | None) -> float:
    saved = restore.clone() if restore is not None else None
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    finally:
        if saved is not None:
            restore.copy_(saved)


def _pick(key: tuple, candidates_of, run, restore, tune: bool) -> tuple:
    """The configuration for ``key``: cached, else the fastest of ``candidates_of()`` (built
    only on a miss: this runs on every launch of an un-graphed step)."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    candidates = candidates_of()
    if not candidates:
        raise RuntimeError(f"no valid launch configuration for {key}")
    if not tune:
        return candidates[0]
    best, best_ms = None, float("inf")
    for cfg in candidates:
        ms = _bench(lambda cfg=cfg: run(cfg), restore)
        if ms < best_ms:
            best, best_ms = cfg, ms
    _CHOSEN[key] = best
    return best


def gemv(x, p: Packed, y, res, *, n, nsplit, opts: FusedOptions, gap=0, xseg=0, act2=0,
         glu=False, norm=None, res2=None, ws: Workspace | None = None) -> None:
    """y (= res +) act(x . W^T + b) (+ res2) over ``n`` output rows (kernels.gemv_kernel);
    ``norm`` = (kind, weight [segments, K], bias or None, eps): x is normalised in the
    kernel (kind 1 LayerNorm, 2 RMSNorm). ``ws``: this stream's workspace, which lets a
    tensor-core GEMV be cut into input parts (without one it is not)."""
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

    def run(cfg):
        launch_gemv(args, meta, n, cfg, ws)

    if not x.is_cuda:
        run(_interp_gemv(p, n, nsplit, x.dtype, glu, ws, opts))
        return
    key = ("gemv", n, p.k, nsplit, p.fmt, p.group, act2, int(glu), int(p.bias is not None),
           int(res is not None), int(res2 is not None), kind,
           str(x.dtype).removeprefix("torch."), opts.asm, opts.int4, opts.parts, opts.pdl,
           ws is not None)
    run(_pick(key, lambda: _gemv_candidates(p, n, nsplit, x.dtype, opts, glu, ws), run, res,
              opts.tune))


def launch_gemv(args: tuple, meta: dict, n: int, cfg: tuple, ws: Workspace | None = None):
    """One launch of kernels.gemv_kernel over ``n`` rows with the configuration ``cfg``
    (BLOCK_N, BLOCK_K, num_warps, num_stages, asm, int4 path, parts); ``args`` are the
    kernel's arguments without the workspace's two (``ws``: needed when parts > 1)."""
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
    # x in one block up to 8,192 (one read, see the kernel); the interpreter: blocks of 32,
    # so the CPU tests take the chunked path too where K > 32
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
    """mask/slot/cs for the token at ``pos`` from the cache's policy (sinks, window, evict
    every R, position mode and offset): ``cache.plan_decode`` and :func:`cos_sin` in one
    launch (see kernels.decode_plan_kernel)."""
    half = freqs.numel()
    block = 256 if pos.is_cuda else 32  # the interpreter: several programs on small caches
    kernels.decode_plan_kernel[(triton.cdiv(cache.slots, block),)](
        pos, freqs, cs, mask, slot, cache.slots, cache.window, cache.compress_every,
        cache.position_offset, S=cache.sink, CACHE_MODE=cache.position_mode == "cache",
        HALF=half, DT=_TL_DTYPE[dtype], BLOCK_H=triton.next_power_of_2(half), BLOCK=block,
        num_warps=2 if pos.is_cuda else 1, **_launch_opts(cs, opts))


def rope_write(buf, q, cs, slot, k, v, ks, vs, layer, slots, hq, hkv, d, half, has_sink,
               kv_int8, opts: FusedOptions, scored=None) -> None:
    """``scored``: a score-based cache's :class:`fastdecode.fused.step.ScoredArgs` (then
    ``slot`` is its per-head ``free``), None for the others."""
    extra = ((scored.t, scored.pos, scored.score, scored.newer) if scored is not None
             else (slot,) * 4)
    flags = scored.flags() if scored is not None else {}
    if scored is not None and scored.cache_mode:  # the newer counts: slots per iteration
        flags["BLOCK_SL"] = min(triton.next_power_of_2(slots), 1024) if buf.is_cuda else 16
    kernels.rope_write_kernel[(hq + hkv,)](
        buf, q, cs, slot, k, v, ks, vs, layer, slots, *extra, HQ=hq, HKV=hkv, D=d, HALF=half,
        HAS_SINK=has_sink, KV_INT8=kv_int8, BLOCK_D=triton.next_power_of_2(d),
        num_warps=1, **flags, **_launch_opts(buf, opts))


def argmax(x, tok, pos, opts: FusedOptions) -> None:
    """tok = argmax(x), pos += 1 (see kernels.argmax_kernel)."""
    cuda = x.is_cuda
    kernels.argmax_kernel[(1,)](x, tok, pos, x.numel(), BLOCK=8192 if cuda else 1024,
                                num_warps=16 if cuda else 1, **_launch_opts(x, opts))


def max_splits(slots: int) -> int:
    return triton.cdiv(slots, MIN_PER)


def attention(q, k, v, ks, vs, mask, m, l_, acc, out, layer, slots, hq, hkv, d, d0, d1,
              sink, kv_int8, scale, opts: FusedOptions, scored=None) -> None:
    """``scored``: a score-based cache's ``ScoredArgs`` (the split kernel keeps the logits,
    the scored combine updates scores and evicts); tuning times the plain kernels, which
    change no cache state."""
    launch = _launch_opts(q, opts)

    def run(cfg, sc=None):
        per, bn, warps = cfg
        nsplit = triton.cdiv(slots, per)
        extra = (sc.t, sc.pos, sc.newer, sc.logit, sc.freqs) if sc is not None else (m,) * 5
        kernels.attn_split_kernel[(hq, nsplit)](
            q, k, v, ks, vs, mask, m, l_, acc, layer, slots, nsplit, per,
            scale, *extra, HQ=hq, HKV=hkv, D=d, D0=d0, D1=d1, S=sink, KV_INT8=kv_int8,
            BLOCK_N=bn, num_warps=warps, **(sc.flags(half=True) if sc is not None else {}),
            **launch)
        common = dict(D=d, BLOCK_S=triton.next_power_of_2(nsplit),
                      BLOCK_D=triton.next_power_of_2(d))
        if sc is None:
            kernels.attn_combine_kernel[(hq,)](m, l_, acc, out, nsplit, **common,
                                               num_warps=1 if nsplit <= 32 else 4, **launch)
            return
        # a tile of [heads, slots] per iteration: <= 4096 values, at most 1024 slots
        bh = triton.next_power_of_2(hq if sc.tova else hq // hkv)
        kernels.attn_combine_scored_kernel[(hkv,)](
            m, l_, acc, out, sc.logit, sc.t, sc.pos, sc.score, sc.newer, sc.free, layer,
            nsplit, slots, sc.sink, sc.recent, HQ=hq, HKV=hkv, TOVA=sc.tova,
            CACHE_MODE=sc.cache_mode, BLOCK_H=bh,
            BLOCK_N=max(16, min(1024, 4096 // bh)) if q.is_cuda else 16,
            num_warps=8 if q.is_cuda else 1, **common, **launch)

    if not q.is_cuda:
        run((MIN_PER, 16, 1), scored)
        return
    key = ("attn", slots, hq, hkv, d, sink, int(kv_int8), str(q.dtype).removeprefix("torch."))
    if opts.attn is not None:
        run(opts.attn, scored)
        return
    run(_pick(key, lambda: [c for c in ATTN_CANDIDATES if c[0] >= MIN_PER and
                            (c[0] <= 64 or math.ceil(slots / c[0]) >= 2)], run, None,
              opts.tune), scored)


__all__ = ["gemv", "Workspace", "parts", "norm", "cos_sin", "decode_plan", "rope_write",
           "attention", "argmax", "chosen", "max_splits"]
