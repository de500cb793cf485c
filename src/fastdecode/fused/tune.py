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

Besides block sizes, a GEMV candidate names two code paths of the quantized formats:
``asm`` (int8/int4 codes to float by a magic-number byte permute in inline PTX instead of
Triton's conversions) and ``int4``, the int4 path (kernels module docstring): 0 = a dot
product per group then scale and zero, 1 = dequantise every weight and reduce once at the
end, 2 = tensor cores (bfloat16/float16 models, groups of 32 or more). :data:`OPTIONS`
(also read from the environment: ``FASTDECODE_ASM`` = 0 or 1, ``FASTDECODE_INT4`` = 0, 1
or 2) pins them; unset, asm is on (:func:`_asm`), and int4 takes path 2 for groups of
128 or more where it applies (else 1). On path 2 a GEMV's inputs may be cut
into ``parts`` (1, 2 or 4), one program each, whose float32 partial sums the last of them
adds in order (:class:`Workspace`); ``FASTDECODE_PARTS`` pins it, unset :func:`parts` picks
it from the number of row blocks. ``pdl``
(``FASTDECODE_PDL=0`` turns it off) launches every kernel with programmatic dependent
launch on Hopper and later: a kernel's programs are placed while the one before finishes,
and a GEMV (int4 paths 0 and 1, int8, float) loads its first weight tile before it waits.
None of them changes a result beyond accumulation order: every path computes the same
float32 values (tests/test_fused.py holds each to the float64 reference and the step to
eager).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import kernels
from .weights import FLOAT, INT4, INT8, Packed

_CHOSEN: dict[tuple, tuple] = {}


def _env_flag(name: str) -> bool | None:
    """A switch from the environment: 0 or 1 (unset or empty: None); anything else is an
    error naming the variable, not a silent "on"."""
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    if v not in ("0", "1"):
        raise ValueError(f"{name}={v!r}: expected 0 or 1")
    return v == "1"


def _env_level(name: str, default: int | None, levels: int) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    if v not in {str(i) for i in range(levels)}:
        raise ValueError(f"{name}={v!r}: expected one of 0..{levels - 1}")
    return int(v)


PARTS = (1, 2, 4)  # the input parts a tensor-core GEMV may be cut into


def _env_parts(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    if v not in {str(p) for p in PARTS}:
        raise ValueError(f"{name}={v!r}: expected one of {', '.join(map(str, PARTS))}")
    return int(v)


MIN_PER = 32  # fewest slots per split of the attention launch; sizes the partial buffers


def _env_attn(name: str) -> tuple[int, int, int] | None:
    """An attention launch pinned as 'slots per split,BLOCK_N,num_warps' (experiments)."""
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        per, bn, warps = (int(t) for t in v.split(","))
    except ValueError:
        raise ValueError(f"{name}={v!r}: expected 'slots per split,BLOCK_N,num_warps', "
                         "e.g. 64,16,2") from None
    if per < MIN_PER or per % bn or bn & (bn - 1) or warps not in (1, 2, 4, 8):
        raise ValueError(f"{name}={v!r}: slots per split >= {MIN_PER} and a multiple of "
                         "BLOCK_N, a power of two; num_warps 1, 2, 4 or 8")
    return per, bn, warps


# tune=False (FASTDECODE_TUNE=0): take the first valid candidate without timing (tests on
# CUDA, where timing every shape a property test draws would dominate)
# norm_in_gemv (FASTDECODE_NORM_IN_GEMV=0, 1 or 2; default 1): the GEMV after a norm
# normalises x in each of its programs instead of a norm kernel launched before it: 0 never,
# 1 where all the GEMVs reading that norm are float, 2 whatever their format (read when a
# FusedStep is built)
# priority (FASTDECODE_PRIORITY=0 or 1; unset: chosen per model, step.choose_priority): the
# captured graph's main chain at a higher stream priority than its side branch
# branches (FASTDECODE_BRANCHES=0, 1 or 2; unset: chosen per model, step.choose_branches):
# in a parallel-residual layer, 1 = the MLP's up projection runs on a second CUDA stream
# beside q/k/v, rotary and attention (two branches of the captured graph), 2 = the whole
# MLP (up, then down) does; 0 = one stream, [qkv; up] as one GEMV before attention (read
# when a FusedStep is built)
OPTIONS = {"pdl": _env_flag("FASTDECODE_PDL") is not False,
           "asm": _env_flag("FASTDECODE_ASM"), "int4": _env_level("FASTDECODE_INT4", None, 3),
           "tune": _env_flag("FASTDECODE_TUNE") is not False,
           "norm_in_gemv": _env_level("FASTDECODE_NORM_IN_GEMV", 1, 3),
           "branches": _env_level("FASTDECODE_BRANCHES", None, 3),
           "parts": _env_parts("FASTDECODE_PARTS"),
           "priority": _env_flag("FASTDECODE_PRIORITY"),
           "attn": _env_attn("FASTDECODE_ATTN")}


_HAS_PDL: dict[int, bool] = {}  # device index -> compute capability >= 9 (asked once)


def pdl(x: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: on, on CUDA devices that have it."""
    if not (OPTIONS["pdl"] and x.is_cuda):
        return False
    i = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if i not in _HAS_PDL:
        _HAS_PDL[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _HAS_PDL[i]


def _launch_opts(x: torch.Tensor) -> dict:
    on = pdl(x)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}

# (BLOCK_N, BLOCK_K, num_warps, num_stages or None); the tuner adds asm / int4 path. Every
# candidate is compiled and timed on first use, so the lists hold the ones that were
# fastest for some Pythia-2.8B shape in scripts/gpu_gemv_sweep.py (each launch of a
# 32-layer graph, perf/results/h100-gemv-sweep.json), and no more: int4 [out | down]
# (12,800 inputs) went 21.9 -> 17.0 us with 1,024 inputs an iteration, int8 down (10,240)
# 11.8 -> 11.1 us with 2,048
GEMV_CANDIDATES = [(2, 1024, 4, None), (4, 1024, 4, None), (8, 256, 4, None),
                   (8, 512, 4, None), (8, 512, 8, None), (8, 1024, 8, None), (16, 256, 4, None),
                   (4, 1024, 4, 1), (2, 2048, 4, None), (4, 2048, 8, None)]
# bf16 keeps the timed list: the graphed sweep's winners (h100-gemv-sweep-bf16-9f19846.json:
# 2/1024/4 without a norm inside, 8/512/8 with LayerNorm inside, each within 2% of the best
# shape by shape) made the bf16-weight step slower than the tuner's picks (int8 KV
# 2.24 -> 2.44 ms at be3f41d): alone and inside the two-stream step they rank differently
# int8: the graphed sweep's winners only (h100-gemv-sweep.json, -int8-mma-5af6f77.json: 8 rows x
# 512 inputs x 8 warps for q/k/v, up and out, 2 x 2048 x 4 for down). With the whole list,
# do_bench's picks (one launch alone) changed from process to process (q/k/v 8/512/4 in
# one, 10.0 us graphed against 9.1; down 4/1024/4, 11.7 against 11.1) and int8 ran
# anywhere from 1.63 to 1.75 ms
INT8_CANDIDATES = [(8, 512, 8, None), (2, 2048, 4, None)]
INT4_CANDIDATES = [(4, 256, 4, None), (8, 256, 4, None), (16, 256, 8, None),
                   (8, 512, 8, None), (4, 1024, 4, None),
                   (8, 1024, 8, None)]  # as GEMV_CANDIDATES; BLOCK_K a multiple of the group
# int4 on tensor cores (path 2): (BLOCK_N, K splits = num_warps, num_stages). In a graph of
# 32 layers (experiments/tc_exp.py, H100, g128) 16 rows x 4 splits x 3 stages was the
# fastest for 2,560 inputs (q/k/v 9.3 -> 7.4 us, up 12.2 -> 8.7 against path 1's best) and
# 16 x 8 x 3 for 10,240 and 12,800 ([out | down] 17.6 -> 14.7 us); more rows, splits or
# stages, a shared-memory stage of two groups, prefetched or transposed scales were slower
INT4_MMA_CANDIDATES = [(16, 4, 3), (16, 8, 3)]
# cut into input parts: 4 warps (graphed, 4 parts: [out | down] 12.8 us with 4, 14.8 with 8;
# down 10.5 / 15.6; perf/results/h100-gemv-sweep-int4-parts-871e4c3.json)
INT4_MMA_PARTS_CANDIDATES = [(16, 4, 3)]
# (slots per split, BLOCK_N, num_warps): one, fixed. Timed alone (do_bench, the tuner's
# way) the attention configurations rank differently than inside the graphed step, where
# each kernel overlaps the one before (PDL): the tuner picked 128-slot splits in some runs
# (int4-g128 bench at 56a998a: 2.25 ms against 2.14 with 64/16/2), and 32-slot splits
# before (023fbbc: 2.33 against 2.17). Timed as a graph of 32 layers on Pythia shapes
# (perf/results/h100-attn-ab-preload.json, 2,053 slots), 64/16/2 beat all 25 others by
# 0.4 us/layer or more (16.9 us; 128-slot splits 18.9-22.8, 256-slot 20.6-39). None of
# those had one warp; in the whole step (bench, FASTDECODE_ATTN, same machine, f4c9930;
# perf/results/h100-attn-warps-f4c9930.txt) 64/16/1 beat 64/16/2: int4 g128 1.448 ->
# 1.382 ms, int8 1.762 -> 1.687 (32/16/1 1.397 / 1.710, 32/32/1 1.387 / 1.696, 128/16/1
# 1.390 / 1.739): with one warp the softmax's reductions need no shared memory and no
# barrier
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


def _mma_ok(p: Packed, n: int, nsplit: int, dtype: torch.dtype) -> bool:
    """int4 on tensor cores: groups of 32 inputs or more (a dot's K is 16 or more), 16-row
    blocks inside each segment, x in a dtype the mma takes (float32 only when pinned)."""
    return (p.fmt == INT4 and p.group >= 32 and not (0 < nsplit < n and nsplit % 16)
            and (dtype in (torch.bfloat16, torch.float16) or OPTIONS["int4"] == 2))


def _asm(applies: bool) -> bool:
    """Inline-PTX conversions: on wherever they apply, unless pinned. Not timed: do_bench's
    choice (one launch alone) flipped from process to process, and inside the graphed step
    the PTX conversion is the faster one everywhere (A/B, 5 rounds, H100,
    perf/results/h100-fused-ab-asm-*.json: int8 1.611 -> 1.556 ms; int4 g128 2.170 ->
    1.341, where Triton's conversion leaves the tensor-core path waiting on float32
    casts)."""
    return applies and (OPTIONS["asm"] is None or bool(OPTIONS["asm"]))


def int4_paths(p: Packed, n: int, nsplit: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The int4 paths to time: as pinned, else tensor cores for groups of 128 or more
    where they apply, path 1 otherwise. Timed one launch at a time (do_bench), path 1 won
    [out | down] and down, which path 2 wins inside the graphed step (int4-g128 on the
    H100: 1.586 ms/token as the tuner picked, 1.509 with path 2 everywhere; int4-mlp-g128
    1.834 against 1.772). With groups of 64 a group is half the bytes an iteration, and the
    suite's int4-mlp-g64 ran 2.212 ms on path 2 against 2.096 on path 1 (runs 0006, 0005)."""
    if p.fmt != INT4:
        return (0,)
    mma = _mma_ok(p, n, nsplit, dtype)
    if OPTIONS["int4"] is not None:
        return (OPTIONS["int4"],) if OPTIONS["int4"] != 2 or mma else (1,)
    return (2,) if mma and p.group >= 128 else (1,)


def parts(n: int, block_n: int, device: torch.device) -> int:
    """How many input parts a tensor-core GEMV of ``n`` rows is cut into (pinned by
    OPTIONS["parts"]): the fewest of :data:`PARTS` that give MIN_PROGRAMS_PER_SM programs
    an SM. The tensor-core GEMVs are bound by instruction latency, so they run faster with
    more warps on each SM, but a part costs its partial sums and more instructions an
    iteration (H100, graphed, 32 layers, int4 g128: [out | down], 160 row blocks, 15.2 us
    whole, 12.9 in 2 parts, 12.8 in 4; down 12.5 / 10.9 / 10.5; q/k/v, 480 blocks, 7.3 /
    10.0 / 11.9; up, 640 blocks, 9.0 / 11.7 / 14.6)."""
    if OPTIONS["parts"] is not None:
        return OPTIONS["parts"]
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


def _parts_choices(n: int, bn: int, glu: bool, ws: Workspace | None) -> tuple[int, ...]:
    if glu or ws is None:
        return (1,)
    k = parts(n, bn, ws.parts.device)
    return (k,) if ws.fits(n, k, bn) else (1,)


def _gemv_candidates(p: Packed, n: int, nsplit: int, dtype: torch.dtype, glu: bool = False,
                     ws: Workspace | None = None) -> list[tuple]:
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
    for path in int4_paths(p, n, nsplit, dtype):
        cfgs = ([(bn, p.group, w, st, k) for k in _parts_choices(n, 16, glu, ws)
                 for bn, w, st in (INT4_MMA_CANDIDATES if k == 1 else
                                   INT4_MMA_PARTS_CANDIDATES)] if path == 2
                else [c + (1,) for c in valid])
        out += [c[:4] + (_asm(p.fmt != 0), path, c[4]) for c in cfgs]
    return out


def _interp_gemv(p: Packed, n: int, nsplit: int, dtype: torch.dtype, glu: bool,
                 ws: Workspace | None) -> tuple:
    """Under the interpreter: small blocks; no inline PTX; the int4 path as pinned (default
    1; tensor cores with two K splits, and the input parts as pinned, else 2 where a
    workspace is given)."""
    path = int4_paths(p, n, nsplit, dtype)[0]
    if path == 2:
        k = OPTIONS["parts"] or 2
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


def _pick(key: tuple, candidates_of, run, restore) -> tuple:
    """The configuration for ``key``: cached, else the fastest of ``candidates_of()`` (built
    only on a miss: this runs on every launch of an un-graphed step)."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    candidates = candidates_of()
    if not candidates:
        raise RuntimeError(f"no valid launch configuration for {key}")
    if not OPTIONS["tune"]:
        return candidates[0]
    best, best_ms = None, float("inf")
    for cfg in candidates:
        ms = _bench(lambda cfg=cfg: run(cfg), restore)
        if ms < best_ms:
            best, best_ms = cfg, ms
    _CHOSEN[key] = best
    return best


def gemv(x, p: Packed, y, res, *, n, nsplit, gap=0, xseg=0, act2=0, glu=False,
         norm=None, res2=None, ws: Workspace | None = None) -> None:
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
                **_launch_opts(x))

    def run(cfg):
        launch_gemv(args, meta, n, cfg, ws)

    if not x.is_cuda:
        run(_interp_gemv(p, n, nsplit, x.dtype, glu, ws))
        return
    key = ("gemv", n, p.k, nsplit, p.fmt, p.group, act2, int(glu), int(p.bias is not None),
           int(res is not None), int(res2 is not None), kind,
           str(x.dtype).removeprefix("torch."), OPTIONS["asm"], OPTIONS["int4"],
           OPTIONS["parts"], ws is not None)
    run(_pick(key, lambda: _gemv_candidates(p, n, nsplit, x.dtype, glu, ws), run, res))


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


def norm(x, nw, nb, out, kind: int, segments: int, eps: float) -> None:
    """out[s] = norm_s(x) for s < segments (nw, nb: [segments, K]; RMSNorm: nb unused)."""
    k = x.numel()
    # x in one block up to 8,192 (one read, see the kernel); the interpreter: blocks of 32,
    # so the CPU tests take the chunked path too where K > 32
    block = triton.next_power_of_2(k)
    block = (block if block <= 8192 else 1024) if x.is_cuda else min(block, 32)
    warps = (8 if block >= 4096 else 4) if x.is_cuda else 1
    kernels.norm_kernel[(segments,)](x, nw, nb if nb is not None else nw, out, eps, K=k,
                                     NORM=kind, BLOCK_K=block, num_warps=warps,
                                     **_launch_opts(x))


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def cos_sin(pos, spos, freqs, cs, dtype) -> None:
    """cs (float32 [2, 2, half]) = cos/sin at pos and at spos (see kernels.cos_sin_kernel)."""
    half = freqs.numel()
    kernels.cos_sin_kernel[(1,)](pos, spos, freqs, cs, HALF=half, DT=_TL_DTYPE[dtype],
                                 BLOCK=triton.next_power_of_2(half), num_warps=1,
                                 **_launch_opts(cs))


def decode_plan(pos, cache, freqs, cs, mask, slot, dtype) -> None:
    """mask/slot/cs for the token at ``pos`` from the cache's policy (sinks, window, evict
    every R, position mode and offset): ``cache.plan_decode`` and :func:`cos_sin` in one
    launch (see kernels.decode_plan_kernel)."""
    half = freqs.numel()
    block = 256 if pos.is_cuda else 32  # the interpreter: several programs on small caches
    kernels.decode_plan_kernel[(triton.cdiv(cache.slots, block),)](
        pos, freqs, cs, mask, slot, cache.slots, cache.window, cache.compress_every,
        cache.position_offset, S=cache.sink, CACHE_MODE=cache.position_mode == "cache",
        HALF=half, DT=_TL_DTYPE[dtype], BLOCK_H=triton.next_power_of_2(half), BLOCK=block,
        num_warps=2 if pos.is_cuda else 1, **_launch_opts(cs))


def rope_write(buf, q, cs, slot, k, v, ks, vs, layer, slots, hq, hkv, d, half, has_sink,
               kv_int8) -> None:
    kernels.rope_write_kernel[(hq + hkv,)](
        buf, q, cs, slot, k, v, ks, vs, layer, slots, HQ=hq, HKV=hkv, D=d, HALF=half,
        HAS_SINK=has_sink, KV_INT8=kv_int8, BLOCK_D=triton.next_power_of_2(d),
        num_warps=1, **_launch_opts(buf))


def argmax(x, tok, pos) -> None:
    """tok = argmax(x), pos += 1 (see kernels.argmax_kernel)."""
    cuda = x.is_cuda
    kernels.argmax_kernel[(1,)](x, tok, pos, x.numel(), BLOCK=8192 if cuda else 1024,
                                num_warps=16 if cuda else 1, **_launch_opts(x))


def max_splits(slots: int) -> int:
    return triton.cdiv(slots, MIN_PER)


def attention(q, k, v, ks, vs, mask, m, l_, acc, out, layer, slots, hq, hkv, d, d0, d1,
              sink, kv_int8, scale) -> None:
    opts = _launch_opts(q)

    def run(cfg):
        per, bn, warps = cfg
        nsplit = triton.cdiv(slots, per)
        kernels.attn_split_kernel[(hq, nsplit)](
            q, k, v, ks, vs, mask, m, l_, acc, layer, slots, nsplit, per, scale, HQ=hq,
            HKV=hkv, D=d, D0=d0, D1=d1, S=sink, KV_INT8=kv_int8, BLOCK_N=bn,
            num_warps=warps, **opts)
        kernels.attn_combine_kernel[(hq,)](
            m, l_, acc, out, nsplit, D=d, BLOCK_S=triton.next_power_of_2(nsplit),
            BLOCK_D=triton.next_power_of_2(d), num_warps=1 if nsplit <= 32 else 4, **opts)

    if not q.is_cuda:
        run((MIN_PER, 16, 1))
        return
    key = ("attn", slots, hq, hkv, d, sink, int(kv_int8), str(q.dtype).removeprefix("torch."))
    if OPTIONS["attn"] is not None:
        run(OPTIONS["attn"])
        return
    run(_pick(key, lambda: [c for c in ATTN_CANDIDATES if c[0] >= MIN_PER and
                            (c[0] <= 64 or math.ceil(slots / c[0]) >= 2)], run, None))


__all__ = ["gemv", "Workspace", "parts", "norm", "cos_sin", "decode_plan", "rope_write",
           "attention", "argmax", "chosen", "max_splits"]
