"""A/B of the fused step's attention on Pythia-2.8B shapes (4 + 2048 slots, 32 layers):
the three-launch path (rope_write, split, combine; kernels of 3c86c8b kept in
scripts/_old_attn_kernels.py) against attention_kernel with the combine fused or not and
the first K/V block loaded before or after the PDL wait. Each variant x launch config is
timed as a CUDA graph of 32 layer calls (PDL chain), replayed; prints us per layer."""
import argparse, importlib.util, itertools, json, sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastdecode.fused import kernels as K  # noqa: E402

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
qkv = torch.randn(3 * H * D, device=dev, dtype=dt, generator=g)
buf = torch.empty(3 * H * D + H * D, device=dev, dtype=dt)
cs = torch.rand(4, HALF, device=dev)
slot = torch.tensor([1000], device=dev)
mask = torch.ones(SLOTS, dtype=torch.int8, device=dev)
q = torch.empty(2, H, D, device=dev, dtype=dt)
ms_ = 2 * triton.cdiv(SLOTS, 32)
m = torch.empty(H, ms_, device=dev)
l_ = torch.empty(H, ms_, device=dev)
acc = torch.empty(H, ms_, D, device=dev)
cnt = torch.zeros(H, dtype=torch.int32, device=dev)
out = buf[3 * H * D:]
scale = D ** -0.5
P = dict(PDL=True, launch_pdl=True)


def layer_call(variant, per, bn, w, i):
    nsplit = triton.cdiv(SLOTS, per)
    bs = triton.next_power_of_2(nsplit)
    if variant == "old":
        old.rope_write_kernel[(2 * H,)](buf, q, cs, slot, kc, vc, kc, vc, i, SLOTS, HQ=H, HKV=H,
                                        D=D, HALF=HALF, HAS_SINK=True, KV_INT8=False,
                                        BLOCK_D=128, num_warps=1, **P)
        old.attn_split_kernel[(H, nsplit)](q, kc, vc, kc, vc, mask, m, l_, acc, i, SLOTS, nsplit,
                                           per, scale, HQ=H, HKV=H, D=D, D0=D0, D1=D1, S=S,
                                           KV_INT8=False, BLOCK_N=bn, num_warps=w, **P)
    else:
        comb = "sepcomb" not in variant
        pre = "nopre" not in variant
        K.attention_kernel[(H, nsplit)](buf, cs, slot, kc, vc, kc, vc, mask, m, l_, acc, cnt, out,
                                        i, SLOTS, nsplit, per, scale, HQ=H, HKV=H, D=D, D0=D0,
                                        D1=D1, HALF=HALF, S=S, KV_INT8=False, BLOCK_N=bn,
                                        BLOCK_S=bs, COMBINE=comb, PRELOAD=pre, num_warps=w, **P)
        if comb:
            return
    K.attn_combine_kernel[(H,)](m, l_, acc, out, nsplit, D=D, BLOCK_S=bs, BLOCK_D=128,
                                num_warps=1 if nsplit <= 32 else 4, **P)


def reference():
    buf[:3 * H * D].copy_(qkv)
    layer_call("old", 64, 16, 2, 0)
    return out.float().clone()


def time_variant(variant, cfg, reps=50):
    buf[:3 * H * D].copy_(qkv)
    for i in range(L):  # warm / compile
        layer_call(variant, *cfg, i)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr, stream=s):
            for i in range(L):
                layer_call(variant, *cfg, i)
    torch.cuda.synchronize()
    for _ in range(5):
        gr.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        e0.record()
        for _ in range(reps):
            gr.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps / L * 1e3)
    return sorted(times)[len(times) // 2]


ref = reference()
results = []
cfgs = [(p, bn, w) for p in (64, 128) for bn, w in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8))]
for variant in ("old", "fused", "fused-nopre", "fused-sepcomb", "fused-sepcomb-nopre"):
    best = None
    for cfg in cfgs:
        if variant != "old" and cfg[1] > cfg[0]:
            continue
        buf[:3 * H * D].copy_(qkv)
        layer_call(variant, *cfg, 0)
        err = (out.float() - ref).abs().max().item()
        us = time_variant(variant, cfg)
        results.append({"variant": variant, "cfg": cfg, "us_per_layer": us, "max_abs_vs_old": err})
        print(f"{variant:22s} per={cfg[0]:4d} bn={cfg[1]:3d} w={cfg[2]}  {us:7.2f} us/layer  err {err:.2e}", flush=True)
        if best is None or us < best[1]:
            best = (cfg, us)
    print(f"== {variant}: best {best[0]} {best[1]:.2f} us/layer ({best[1] * L / 1e3:.3f} ms/step)", flush=True)
if args.json:
    Path(args.json).write_text(json.dumps({"commit_note": "see .carry/commit", "results": results}, indent=1))
