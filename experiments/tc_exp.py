# ruff: noqa  (the experiment as it ran: closures over loop variables are called in the loop)
"""The experiment behind the int4 tensor-core GEMV (fused/kernels.py, I4 path 2).

A standalone kernel (no norm, bias or residual fusion) on the four int4 g128 GEMV shapes of
Pythia-2.8B's step, 32 distinct weights a shape in one CUDA graph, no PDL, against the
CUDA-core kernel's best configuration (path 1, with PDL, as scripts/gpu_gemv_sweep.py launches
it). Configurations are (rows, groups an iteration, K splits = warps, stages, flags: 1 =
scales prefetched an iteration ahead, 2 = scales stored group-major); EXACT: codes as
q - 8 (the kept form) or as 128 + q with 136 x sum(x) folded into the zero term. Results
of the three rounds: experiments/results/h100-int4-mma-experiments.txt (earlier rounds also had a
two-groups-a-stage variant, since removed: slower everywhere).

    PYTHONPATH=src:scripts TC_CFGS="16,1,4,3,0;16,1,8,3,0" python experiments/tc_exp.py
"""
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import torch
import triton
import triton.language as tl
from gpu_quant_bench import time_graph

from fastdecode.fused import kernels
from fastdecode.fused.weights import INT4, Packed
from fastdecode.quant.int4 import quantize_int4


@triton.jit
def _u4(p, EXACT: tl.constexpr):
    """EXACT: the kernel's conversion, (q - 8) in bf16 (it ran here with add.bf16x2, the
    kernel has fma.bf16x2: same values, same count); else 128 + q (no subtraction)."""
    if EXACT:
        return kernels._u4_to_dot(p, tl.bfloat16, True)
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, m;
            and.b32 lo, $4, 0x0F0F0F0F;
            shr.b32 hi, $4, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            mov.b32 m, 0x43434343;
            prmt.b32 $0, lo, m, 0x5140;
            prmt.b32 $1, lo, m, 0x7362;
            prmt.b32 $2, hi, m, 0x5140;
            prmt.b32 $3, hi, m, 0x7362;
            }""",
            constraints="=r,=r,=r,=r,r", args=[p],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _group(acc, p, x, s, z, HG: tl.constexpr, SPLIT: tl.constexpr, PAD: tl.constexpr,
           EXACT: tl.constexpr):
    lo, hi = _u4(p, EXACT)
    xe, xo = tl.split(tl.reshape(x, (SPLIT, HG, 2)))
    d = tl.dot(lo, tl.broadcast_to(xe[:, :, None], (SPLIT, HG, PAD)))
    d = tl.dot(hi, tl.broadcast_to(xo[:, :, None], (SPLIT, HG, PAD)), d)
    s = s.to(tl.float32)
    z = z.to(tl.float32)
    sx = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)  # [SPLIT]
    if EXACT:
        acc += d * s[:, :, None] + (z * sx[:, None])[:, :, None]
    else:
        acc += d * s[:, :, None] + ((z - 136.0 * s) * sx[:, None])[:, :, None]
    return acc


@triton.jit
def _sz(s_ptr, z_ptr, rows, sp, gi, GPS: tl.constexpr, NGRP: tl.constexpr, N, TRANS: tl.constexpr):
    g = sp * GPS + gi
    mg = (gi < GPS) & (g < NGRP)
    if TRANS:
        off = g[:, None] * N + rows[None, :]
    else:
        off = rows[None, :] * NGRP + g[:, None]
    s = tl.load(s_ptr + off, mask=mg[:, None], other=0.0)
    z = tl.load(z_ptr + off, mask=mg[:, None], other=0.0)
    return s, z


@triton.jit
def tc_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, GPI: tl.constexpr, SPLIT: tl.constexpr,
                   EXACT: tl.constexpr, PREFETCH: tl.constexpr, TRANS: tl.constexpr):
    """SPLIT K ranges a program (a batched dot: one warp each), GPI groups an iteration."""
    PAD: tl.constexpr = 16
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    HG: tl.constexpr = GROUP // 2
    NGRP: tl.constexpr = K // GROUP
    GPS: tl.constexpr = (NGRP + SPLIT - 1) // SPLIT  # groups a split
    sp = tl.arange(0, SPLIT)
    acc = tl.zeros((SPLIT, BLOCK_N, PAD), tl.float32)
    s_n, z_n = _sz(s_ptr, z_ptr, rows, sp, 0, GPS, NGRP, N, TRANS)
    for gi in range(0, GPS):
        g = sp * GPS + gi  # [SPLIT]
        mg = (gi < GPS) & (g < NGRP)
        hb = g[:, None] * HG + tl.arange(0, HG)[None, :]  # [SPLIT, HG]
        p = tl.load(w_ptr + rows[None, :, None] * (K // 2) + hb[:, None, :],
                    mask=mg[:, None, None], other=0)
        x = tl.load(x_ptr + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :],
                    mask=mg[:, None], other=0.0)
        s, z = s_n, z_n
        if PREFETCH:
            s_n, z_n = _sz(s_ptr, z_ptr, rows, sp, gi + 1, GPS, NGRP, N, TRANS)
        else:
            s, z = _sz(s_ptr, z_ptr, rows, sp, gi, GPS, NGRP, N, TRANS)
        acc = _group(acc, p, x, s, z, HG, SPLIT, PAD, EXACT)
    cols = tl.arange(0, PAD)
    y = tl.sum(tl.sum(tl.where(cols[None, None, :] == 0, acc, 0.0), axis=2), axis=0)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


SHAPES = [("int4 qkv", 7680, 2560), ("int4 up", 10240, 2560), ("int4 out|down", 2560, 12800),
          ("int4 down", 2560, 10240)]
BEST_OLD = {"int4 qkv": (8, 512, 8, None, True, True), "int4 up": (8, 512, 8, None, True, True),
            "int4 out|down": (4, 1024, 4, None, True, True), "int4 down": (4, 1024, 4, None, True, True)}


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    cfgs = [(16, 1, 4, 3, 0), (16, 1, 4, 3, 1), (16, 1, 4, 3, 3), (16, 1, 4, 3, 2),
            (16, 1, 4, 4, 3), (16, 1, 4, 2, 3),
            (16, 1, 8, 3, 0), (16, 1, 8, 3, 1), (16, 1, 8, 3, 3), (16, 1, 8, 4, 3),
            (32, 1, 4, 3, 3), (16, 1, 2, 3, 3), (32, 1, 8, 3, 3), (16, 1, 16, 3, 3)]
    only = os.environ.get("TC_CFGS")
    if only:
        cfgs = [tuple(int(v) for v in c.split(",")) for c in only.split(";")]
    log = open(os.path.join(os.environ.get("OUT", "/tmp"), "tc_exp.txt"), "w")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    for name, n, k in SHAPES:
        ps = []
        for _ in range(32):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            p, s, z = quantize_int4(w, 128, method="rtn", param_dtype=torch.bfloat16)
            ps.append(Packed(INT4, p, s, z, 128, None))
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ys = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for _ in ps]
        nbytes = ps[0].nbytes()
        st_ = [p.s.t().contiguous() for p in ps]
        zt_ = [p.z.t().contiguous() for p in ps]
        from gpu_gemv_sweep import _launch
        cfg0 = BEST_OLD[name]
        ms, _ = time_graph(lambda: [_launch(x, p, y, cfg0) for p, y in zip(ps, ys)], 20)
        ref = ys[0].float().clone()
        us0 = ms * 1000 / 32
        say(f"{name:14s} current {cfg0} {us0:7.2f} us {nbytes / us0 / 1e3:6.0f} GB/s")
        rows = [{"cfg": "current", "us": us0}]
        for (bn, gpi, split, st, wide), exact in itertools.product(cfgs, (True, False)):
            if not exact and (bn, gpi, split, st, wide) not in cfgs[2:3] + cfgs[8:9]:
                continue
            def run():
                for i, (p, y) in enumerate(zip(ps, ys)):
                    tc_gemv_kernel[(n // bn,)](x, p.w, st_[i] if wide & 2 else p.s, zt_[i] if wide & 2 else p.z, y, n, K=k, GROUP=128,
                                               BLOCK_N=bn, GPI=gpi, SPLIT=split, EXACT=exact, PREFETCH=bool(wide & 1), TRANS=bool(wide & 2),
                                               num_warps=split, num_stages=st)
            try:
                ms, _ = time_graph(run, 20)
            except Exception as e:
                say(f"{name} {bn, gpi, split, st, wide} failed {str(e)[:200]}")
                raise
            us = ms * 1000 / 32
            err = ((ys[0].float() - ref).norm() / ref.norm()).item()
            say(f"{name:14s} tc bn={bn} gpi={gpi} split={split} st={st} prefetch={wide} exact={int(exact)} "
                f"{us:7.2f} us {nbytes / us / 1e3:6.0f} GB/s err {err:.1e}")
            rows.append({"cfg": [bn, gpi, split, st, wide, exact], "us": us, "err": err})
        out[name] = rows
        del ps, ys
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        json.dump(out, open(os.path.join(os.environ["OUT"], "tc_exp.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
