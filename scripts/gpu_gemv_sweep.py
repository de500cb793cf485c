"""Every GEMV launch configuration the tuner knows, timed the way the decode step runs them.

For each GEMV shape of Pythia-2.8B's fused step (bf16: [out | down], up, q/k/v, out (the
int4-MLP layout) and the head; int8: q/k/v, up,
out, down; int4 g128: q/k/v, up, [out | down], down), 32 weights (one a layer, so the L2
cache holds none of them across launches) are launched back to back in one CUDA graph, as
in the step, for every candidate of ``tune._gemv_candidates``; the graph is replayed and
timed with CUDA events (median of ``--reps``). Reports microseconds a launch and the
weight bytes read a second, the best candidate a shape, and the one the tuner's own timing
(``do_bench``: one launch alone, L2 flushed) ranks first. Each candidate's output is
checked against the first's.

    PYTHONPATH=src python scripts/gpu_gemv_sweep.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_quant_bench import time_graph  # scripts/ is on the path when run as a script

from fastdecode.fused import FusedOptions, tune
from fastdecode.quant.int4 import quantize_int4
from fastdecode.quant.int8 import quantize_int8
from fastdecode.quant.layout import FLOAT, INT4, INT8, Packed

SHAPES = [  # name, format, rows, inputs
    ("bf16 out|down", FLOAT, 2560, 12800), ("bf16 up", FLOAT, 10240, 2560),
    ("bf16 qkv", FLOAT, 7680, 2560), ("bf16 out", FLOAT, 2560, 2560),
    ("bf16 head", FLOAT, 50304, 2560),
    # the float GEMVs after a norm take it inside (NORM 1, LayerNorm): q/k/v, up, head
    ("bf16 qkv+norm", FLOAT, 7680, 2560), ("bf16 up+norm", FLOAT, 10240, 2560),
    ("bf16 head+norm", FLOAT, 50304, 2560),
    ("int8 qkv", INT8, 7680, 2560), ("int8 up", INT8, 10240, 2560),
    ("int8 out", INT8, 2560, 2560), ("int8 down", INT8, 2560, 10240),
    ("int4 qkv", INT4, 7680, 2560), ("int4 up", INT4, 10240, 2560),
    ("int4 out|down", INT4, 2560, 12800), ("int4 down", INT4, 2560, 10240),
]


def _weights(fmt, n, k, layers, gen):
    out = []
    for _ in range(layers):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        if fmt == FLOAT:
            out.append(Packed(FLOAT, w, None, None, k, None))
        elif fmt == INT8:
            q, s = quantize_int8(w)
            out.append(Packed(INT8, q, s[:, None].to(torch.bfloat16).contiguous(), None, k, None))
        else:
            p, s, z = quantize_int4(w, 128, method="rtn", param_dtype=torch.bfloat16)
            out.append(Packed(INT4, p, s, z, 128, None))
    return out


def _launch(x, p, y, cfg, ws, nw=None):
    """One GEMV launch; ``nw``: a LayerNorm's [weight; bias] rows, normalised inside."""
    nb = nw[1:] if nw is not None else x
    nw = nw if nw is not None else x
    args = (x, p.w, p.s if p.s is not None else p.w, p.z if p.z is not None else p.w, p.w,
            y, y, y, nw, nb, 1e-5, p.n, p.n, 0, 0)
    meta = dict(K=p.k, FMT=p.fmt, GROUP=p.group, ACT2=0, GLU=False, HAS_BIAS=False,
                HAS_RES=False, HAS_RES2=False, NORM=int(nw is not x),
                **tune._launch_opts(x, OPTS))
    tune.launch_gemv(args, meta, p.n, cfg, ws)


OPTS = FusedOptions.from_env()  # the environment, read once, here at the edge


def _time_graph(x, ps, ys, cfg, reps, ws, nw=None):
    """µs a launch: the chain of launches captured as one graph (gpu_quant_bench.time_graph)."""
    def chain():
        for p, y in zip(ps, ys):
            _launch(x, p, y, cfg, ws, nw)

    median_ms, _ = time_graph(chain, reps)
    return median_ms * 1000 / len(ps)


def _tuner_pick(x, p, y, cfgs, ws, nw=None):
    """The candidate the tuner's timing ranks first (tune._bench: one launch, do_bench)."""
    return min(cfgs, key=lambda c: tune._bench(lambda: _launch(x, p, y, c, ws, nw), None))


def _candidates(p, n, dtype, ws, parts, asm=(True,)):
    """The tuner's candidates, for each pinned number of input parts (tensor-core int4)
    and each inline-PTX setting in ``asm``."""
    out = []
    for k in parts:
        for a in asm:
            opts = FusedOptions.from_env(parts=k, asm=a)
            out += [c for c in tune._gemv_candidates(p, n, n, dtype, opts, ws=ws)
                    if c not in out]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="", help="comma-separated names (default: all)")
    ap.add_argument("--all-paths", action="store_true",
                    help="also the path the tuner never takes unpinned: no inline PTX")
    ap.add_argument("--candidates", default="",
                    help="instead of the tuner's lists: 'BLOCK_N,BLOCK_K,warps,stages;...' "
                         "(stages 0: the default), each with the tuner's asm/int4 choices")
    ap.add_argument("--parts", default="1",
                    help="input parts of the tensor-core int4 GEMVs to time, e.g. 1,2,4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.candidates:
        own = [tuple(int(v) for v in c.split(",")) for c in args.candidates.split(";")]
        own = [(bn, bk, w, st or None) for bn, bk, w, st in own]
        tune.GEMV_CANDIDATES[:] = own
        tune.INT4_CANDIDATES[:] = own
        tune.INT8_CANDIDATES[:] = own
    gen = torch.Generator(device="cuda").manual_seed(0)
    want = set(args.shapes.split(",")) if args.shapes else None
    out = {"device": torch.cuda.get_device_name(), "layers": args.layers, "shapes": {}}
    for name, fmt, n, k in SHAPES:
        if want and name not in want:
            continue
        ps = _weights(fmt, n, k, args.layers, gen)
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ys = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for _ in ps]
        nw = (torch.rand(2, k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
              if name.endswith("+norm") else None)
        nbytes = ps[0].nbytes()
        rows = []
        ref = None
        ws = tune.Workspace(n, x.device)
        for cfg in _candidates(ps[0], n, x.dtype, ws, [int(k) for k in args.parts.split(",")],
                               (False, True) if args.all_paths else (True,)):
            try:
                us = _time_graph(x, ps, ys, cfg, args.reps, ws, nw)
            except Exception as e:  # a configuration that does not compile here
                print(f"{name:14s} {cfg} failed: {str(e)[:120]}", flush=True)
                continue
            y0 = ys[0].float()
            ref = y0 if ref is None else ref
            err = ((y0 - ref).norm() / ref.norm()).item()
            rows.append({"cfg": list(cfg), "us": us, "GBps": nbytes / us / 1e3, "rel_err": err})
            print(f"{name:14s} {str(cfg):44s} {us:7.2f} us {nbytes / us / 1e3:7.0f} GB/s "
                  f"err {err:.1e}", flush=True)
        best = min(rows, key=lambda r: r["us"])
        tuner = _tuner_pick(x, ps[0], ys[0], [tuple(r["cfg"]) for r in rows], ws, nw)
        by_cfg = {tuple(r["cfg"]): r for r in rows}
        print(f"{name:14s} best {best['cfg']} {best['us']:.2f} us {best['GBps']:.0f} GB/s; "
              f"do_bench picks {list(tuner)} {by_cfg[tuner]['us']:.2f} us", flush=True)
        out["shapes"][name] = {"rows": n, "inputs": k, "weight_bytes": nbytes,
                               "candidates": rows, "best": best, "do_bench_pick": list(tuner)}
        del ps, ys
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
