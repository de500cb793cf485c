"""Weight-only GEMV microbenchmark on Pythia-2.8B shapes (run on a CUDA machine).

For each implementation: 32 layers x (qkv, out, up, down) distinct weights (5.3 GB in bf16,
so nothing sits in L2), the whole 128-GEMV chain compiled and captured in one CUDA graph,
timed over graph replays with CUDA events. The result is "ms per token for the linears
alone" — the number weight-only quantization must lower. Also checks each fast
implementation against our dequantize-then-matmul reference on the same weights.

    python scripts/gpu_quant_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from torch import nn

SHAPES = {"qkv": (2560, 7680), "out": (2560, 2560), "up": (2560, 10240), "down": (10240, 2560)}


def build(layers: int, make):
    mods = nn.ModuleList()
    for _ in range(layers):
        for name, (k, n) in SHAPES.items():
            lin = nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
            nn.init.normal_(lin.weight, std=0.02)
            mods.append(make(lin, name))
    return mods


def chain(mods):
    def f(xs):
        out = None
        for m in mods:
            k = m.in_features if hasattr(m, "in_features") else m.weight.shape[1]
            y = m(xs[k])
            out = y if out is None else out + y[..., :1].sum()
        return out
    return f


def time_graph(fn, xs, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(xs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(xs)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def weight_bytes(mods):
    return sum(t.numel() * t.element_size() for m in mods for t in
               list(m.parameters()) + list(m.buffers()) if t.dim() >= 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fastdecode.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (2560, 10240)}
    results = {}

    def run(name, make, compile_it=True):
        torch.cuda.empty_cache()
        try:
            mods = build(args.layers, make)
            fn = chain(mods)
            if compile_it:
                fn = torch.compile(fn, fullgraph=False)
            ms = time_graph(fn, xs)
            nbytes = weight_bytes(mods)
            results[name] = {"ms": ms, "weight_GB": nbytes / 1e9, "GBps": nbytes / ms / 1e6}
            print(f"{name:28s} {ms:7.3f} ms  {nbytes / 1e9:6.2f} GB  {nbytes / ms / 1e6:7.0f} GB/s",
                  flush=True)
            del mods, fn
        except Exception as e:  # record and go on: one failing candidate must not hide others
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name:28s} FAILED {results[name]['error']}", flush=True)

    def ours(kind, backend, group=128):
        def make(lin, _):
            m = (Int8Linear.from_linear(lin) if kind == "int8"
                 else Int4Linear.from_linear(lin, group))
            m.set_backend(backend)
            return m
        return make

    run("bf16 cuBLAS (eager graph)", lambda lin, _: lin, compile_it=False)
    run("bf16 compiled", lambda lin, _: lin)
    run("int8 ours-triton", ours("int8", "triton"), compile_it=False)
    run("int8 ours-triton compiled", ours("int8", "triton"))
    run("int8 dequant compiled", ours("int8", "reference"))
    for g in (64, 128):
        run(f"int4 g{g} ours-triton", ours("int4", "triton", g), compile_it=False)
        run(f"int4 g{g} tinygemm", ours("int4", "tinygemm", g), compile_it=False)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        def ao(cfg):
            def make(lin, _):
                holder = nn.Sequential(lin)
                quantize_(holder, cfg)
                return holder[0]
            return make
        run("int8 torchao v2 compiled", ao(Int8WeightOnlyConfig(version=2)))
        for g in (64, 128):
            run(f"int4 g{g} torchao tile4d compiled",
                ao(Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")))
    except ImportError as e:
        results["torchao"] = {"error": str(e)}
        print("torchao not importable:", e)

    # Fast paths vs reference on one layer of real shapes (bf16 tolerance).
    checks = {}
    for kind, backend, g in (("int8", "triton", 0), ("int4", "triton", 128),
                             ("int4", "tinygemm", 128), ("int4", "triton", 64)):
        lin = nn.Linear(2560, 10240, device="cuda", dtype=torch.bfloat16)
        nn.init.normal_(lin.weight, std=0.02)
        m = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, g)
        x = torch.randn(1, 2560, device="cuda", dtype=torch.bfloat16)
        ref = m(x).float()
        m.set_backend(backend)
        rel = ((m(x).float() - ref).norm() / ref.norm()).item()
        checks[f"{kind}-g{g}-{backend}"] = rel
        print(f"check {kind} g{g} {backend}: rel err vs reference {rel:.2e}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "layers": args.layers, "results": results, "checks": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    bad = [k for k, v in checks.items() if not v < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
