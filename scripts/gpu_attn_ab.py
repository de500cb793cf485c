"""A/B of the fused step's attention on Pythia-2.8B shapes (4 + 2048 slots, 32 layers).

Every launch configuration of ``tune.attention`` (slots per split, BLOCK_N, warps, K/V
preloaded before the PDL wait, loop unrolled) and the split kernel of 3c86c8b
(scripts/_old_attn_kernels.py), each with rope_write before and the combine after, timed
as a CUDA graph of 32 layer calls (PDL chain, replayed; the graph reads 0.67 GB of KV,
more than L2). After the timed replays the output of the last layer is compared with the
three-launch path of 3c86c8b run without PDL. Prints us per layer; --json keeps them."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastdecode.fused import kernels as K  # noqa: E402
from fastdecode.fused import tune  # noqa: E402

spec = importlib.util.spec_from_file_location("old", Path(__file__).with_name("_old_attn_kernels.py"))
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

ap = argparse.ArgumentParser()
ap.add_argument("--json", default=None)
ap.add_argument("--slots", type=int, default=2053)
args = ap.parse_args()
dev, dt = "cuda", torch.bfloat16
L, H, D, D0, D1, HALF, S, SLOTS = 32, 32, 80, 64, 16, 10, 4, args.slots
g = torch.Generator(device=dev).manual_seed(0)
kc = torch.randn(L, H, SLOTS, D, device=dev, dtype=dt, generator=g)
vc = torch.randn(L, H, SLOTS, D, device=dev, dtype=dt, generator=g)
buf = torch.randn(4 * H * D, device=dev, dtype=dt, generator=g)
cs = torch.rand(4, HALF, device=dev)
slot = torch.tensor([1000], device=dev)
mask = torch.ones(SLOTS, dtype=torch.int8, device=dev)
q = torch.empty(2, H, D, device=dev, dtype=dt)
ms_ = tune.max_splits(SLOTS)
m = torch.empty(H, ms_, device=dev)
l_ = torch.empty(H, ms_, device=dev)
acc = torch.empty(H, ms_, D, device=dev)
out = buf[3 * H * D:]
scale = D ** -0.5


def layer_call(cfg, i, pdl=True):
    P = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)
    old.rope_write_kernel[(2 * H,)](buf, q, cs, slot, kc, vc, kc, vc, i, SLOTS, HQ=H, HKV=H,
                                    D=D, HALF=HALF, HAS_SINK=True, KV_INT8=False,
                                    BLOCK_D=128, num_warps=1, **P)
    if cfg[0] == "old":
        per, bn, w = cfg[1:]
        nsplit = triton.cdiv(SLOTS, per)
        old.attn_split_kernel[(H, nsplit)](q, kc, vc, kc, vc, mask, m, l_, acc, i, SLOTS, nsplit,
                                           per, scale, HQ=H, HKV=H, D=D, D0=D0, D1=D1, S=S,
                                           KV_INT8=False, BLOCK_N=bn, num_warps=w, **P)
    else:
        per, bn, w, pre, unr = cfg
        nsplit = triton.cdiv(SLOTS, per)
        K.attn_split_kernel[(H, nsplit)](q, kc, vc, kc, vc, mask, slot, m, l_, acc, i, SLOTS,
                                         nsplit, scale, HQ=H, HKV=H, D=D, D0=D0, D1=D1, S=S,
                                         KV_INT8=False, PER=per, BLOCK_N=bn, PRELOAD=pre,
                                         UNROLL=unr, num_warps=w, **P)
    K.attn_combine_kernel[(H,)](m, l_, acc, out, nsplit, D=D,
                                BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_D=128,
                                num_warps=1 if nsplit <= 32 else 4, **P)


layer_call(("old", 64, 16, 2), L - 1, pdl=False)
ref = out.float().clone()


def time_cfg(cfg, reps=40):
    for i in range(L):  # compile, warm
        layer_call(cfg, i)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr, stream=s):
            for i in range(L):
                layer_call(cfg, i)
    torch.cuda.synchronize()
    for _ in range(5):
        gr.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        e0.record()
        for _ in range(reps):
            gr.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps / L * 1e3)
    err = (out.float() - ref).abs().max().item()
    return sorted(times)[len(times) // 2], err


cfgs = [("old", p, bn, w) for p, bn, w in tune.ATTN_CANDIDATES if p <= 128]
cfgs += tune.attention_candidates(SLOTS)
results = []
for cfg in cfgs:
    us, err = time_cfg(cfg)
    results.append({"cfg": list(cfg), "us_per_layer": us, "max_abs_vs_3c86c8b": err})
    print(f"{str(cfg):36s} {us:7.2f} us/layer  err {err:.2e}", flush=True)
results.sort(key=lambda r: r["us_per_layer"])
print("fastest:")
for r in results[:8]:
    print(f"  {str(tuple(r['cfg'])):36s} {r['us_per_layer']:7.2f}  ({r['us_per_layer'] * L / 1e3:.3f} ms/step)")
old_best = min(r["us_per_layer"] for r in results if r["cfg"][0] == "old")
print(f"3c86c8b best {old_best:.2f} us/layer")
if args.json:
    Path(args.json).write_text(json.dumps({"slots": SLOTS, "layers": L, "results": results}, indent=1))
