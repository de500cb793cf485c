"""Weight-only GEMV microbenchmark on Pythia-2.8B shapes (run on a CUDA machine).

For each implementation: 32 layers x (qkv, out, up, down) distinct weights (5.3 GB in bf16,
so nothing sits in L2), one functional GEMV per shape (compiled once per shape where the
implementation needs torch.compile), the whole 128-GEMV chain captured in one CUDA graph
and timed over replays with CUDA events: "ms per token for the linears alone", the number
weight-only quantization must lower. Also checks every fast path against our
dequantize-then-matmul reference on the same weights.

    PYTHONPATH=src python scripts/gpu_quant_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (2560, 7680), "out": (2560, 2560), "up": (2560, 10240), "down": (10240, 2560)}


def time_graph(run, reps=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times)


def nbytes(args):
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fastdecode.quant.int4 import quantize_int4, to_tinygemm
    from fastdecode.quant.int8 import quantize_int8

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    xs = {k: torch.randn(1, k, device="cuda", dtype=bf16) for k in (2560, 10240)}
    results = {}

    def impl_int8(w):
        q, s = quantize_int8(w)
        return q, s.to(bf16)

    def impl_tinygemm(g):
        def prep(w):
            p, s, z = quantize_int4(w, g)
            return to_tinygemm(p, s.to(bf16), z.to(bf16))
        return prep

    def impl_torchao(cfg):
        from torch import nn
        from torchao.quantization import quantize_

        def prep(w):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=bf16)
            lin.weight.data.copy_(w)
            quantize_(lin, cfg)
            return (lin.weight,)
        return prep

    def run(name, prep, fn, compile_it):
        torch.cuda.empty_cache()
        try:
            f = torch.compile(fn, dynamic=False) if compile_it else fn
            layers, total = [], 0
            for _ in range(args.layers):
                for k, n in SHAPES.values():
                    w = torch.randn(n, k, device="cuda", dtype=bf16) * 0.02
                    b = torch.randn(n, device="cuda", dtype=bf16) * 0.02
                    a = prep(w)
                    layers.append((k, a, b))
                    total += nbytes(a) + nbytes((b,))
            out = {}

            def chain():
                acc = None
                for k, a, b in layers:
                    y = f(xs[k], *a, b)
                    acc = y[:, :8] if acc is None else acc + y[:, :8]
                out["y"] = acc

            med, best = time_graph(chain)
            results[name] = {"ms_median": med, "ms_min": best, "weight_GB": total / 1e9,
                             "GBps": total / med / 1e6}
            print(f"{name:34s} {med:7.3f} ms (min {best:6.3f})  {total / 1e9:5.2f} GB  "
                  f"{total / med / 1e6:6.0f} GB/s", flush=True)
        except Exception as e:  # one failing candidate must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
            print(f"{name:34s} FAILED {results[name]['error'][:300]}", flush=True)

    ident = lambda w: (w,)
    run("bf16 cuBLAS", ident, lambda x, w, b: F.linear(x, w, b), False)
    run("bf16 compiled", ident, lambda x, w, b: F.linear(x, w, b), True)
    run("int8 dequant+linear compiled", impl_int8,
        lambda x, q, s, b: F.linear(x, q.to(x.dtype) * s[:, None], b), True)
    for g in (64, 128):
        run(f"int4 g{g} tinygemm", impl_tinygemm(g),
            lambda x, w, szs, b, g=g: torch.ops.aten._weight_int4pack_mm(x, w, g, szs) + b,
            False)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        run("int8 torchao v2 compiled", impl_torchao(Int8WeightOnlyConfig(version=2)),
            lambda x, w, b: F.linear(x, w, b), True)
        for g in (64, 128):
            run(f"int4 g{g} torchao tile4d compiled",
                impl_torchao(Int4WeightOnlyConfig(group_size=g,
                                                  int4_packing_format="tile_packed_to_4d")),
                lambda x, w, b: F.linear(x, w, b), True)
    except ImportError as e:
        results["torchao"] = {"error": str(e)}
        print("torchao not importable:", e)

    # Fast paths vs the reference on real shapes (bf16 operands).
    from torch import nn

    from fastdecode.quant import Int4Linear, Int8Linear
    checks = {}
    for kind, backend, g in (("int8", "inductor", 0), ("int4", "tinygemm", 128),
                             ("int4", "tinygemm", 64)):
        lin = nn.Linear(2560, 10240, device="cuda", dtype=bf16)
        nn.init.normal_(lin.weight, std=0.02)
        m = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, g)
        for rows in (1, 7):
            x = torch.randn(rows, 2560, device="cuda", dtype=bf16)
            m.set_backend("reference")
            ref = m(x).float()
            m.set_backend(backend)
            rel = ((m(x).float() - ref).norm() / ref.norm()).item()
            checks[f"{kind}-g{g}-{backend}-rows{rows}"] = rel
            print(f"check {kind} g{g} {backend} rows={rows}: rel err vs reference {rel:.2e}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "layers": args.layers, "results": results, "checks": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if any(not v < 2e-2 for v in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
