"""Prefill at flash speed, measured on a CUDA machine in one run (issue 19).

On Pythia-2.8B shapes (random weights, bf16):

(a) the flash prefill kernel against the reference attention (``attention.attend``) on
    CUDA for a few policies and both head layouts, and the whole model's last logits
    through ``Decoder.prefill`` on both paths (bf16 tolerance);
(b) prefill of 2,048 / 4,096 / 8,192 / 16,384 tokens into a 4+2048 streaming cache and a
    dense one (max_len = the prompt), CUDA events, median of ``--reps``, beside
    transformers' own forward of the same prompt (SDPA, a DynamicCache, the last logits
    only: what a user's ``generate`` does first);
(c) the bf16 matmul rate in the same process (a large ``torch.mm``) and each prefill
    against the compute floor 2 * params * T / rate;
(d) the exact parallel PPL evaluator on 8,192 tokens into 4+2048: the old path (reference
    attention, 512-token chunks) against the new one (the kernel, default chunks);
(e) one JSON record (``--json``, default ``$OUT/gpu_prefill.json``) and a short table.

Also launch configurations of the kernel (``--sweep``: the default few, ``wide``, or a
list ``BM/BN/warps/stages,...``) on the ``--sweep-lengths`` prefills beside the card's
default (``flash_prefill.launch_config``; ``--config`` overrides it for the whole run), and
a torch.profiler breakdown of one 16k prefill. ``--parts`` picks the sections.

    PYTHONPATH=src python scripts/gpu_prefill.py
    PYTHONPATH=src python scripts/gpu_prefill.py --parts sweep --sweep wide \
        --sweep-lengths 4096,16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import torch

LENGTHS = (2048, 4096, 8192, 16384)
PARTS = ("checks", "sweep", "ours", "ab", "profile", "ppl", "hf")
SWEEPS = {  # kernel launch configurations, BM/BN/warps/stages
    "default": "128/64/8/3,128/64/4/3,128/128/8/2,64/64/4/3,128/32/4/4",
    "wide": "128/64/4/3,128/64/8/3,128/64/4/2,128/64/4/4,128/32/4/4,128/128/8/2,"
            "64/64/4/3,64/128/4/3,64/32/4/4",
}


def parse_configs(text: str) -> list[dict]:
    """``BM/BN/warps/stages,...`` (or a name in SWEEPS) -> launch configurations."""
    out = []
    for item in SWEEPS.get(text, text).split(","):
        bm, bn, w, st = (int(x) for x in item.split("/"))
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st})
    return out


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_ms(fn, reps: int, warm: int = 1) -> dict:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"median": statistics.median(times), "min": min(times), "all": times}


def section(name, rec, fn):
    t0 = time.perf_counter()
    try:
        rec[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the rest
        rec[name] = {"error": f"{type(e).__name__}: {e}"[:3000],
                     "trace": traceback.format_exc()[-3000:]}
        print(f"{name} FAILED: {e}", flush=True)
    print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)


def kernel_checks(spec_heads):
    from fastdecode import attention as A
    from fastdecode.cache import CacheConfig, make_cache

    class Spec:
        num_layers = 1

        def __init__(self, hkv, d):
            self.num_kv_heads, self.head_dim = hkv, d

    out = []
    cases = [
        (CacheConfig(policy="streaming", sink=4, window=2048), 3000, 2048),
        (CacheConfig(policy="streaming", sink=4, window=2048), 0, 4096),
        (CacheConfig(policy="streaming", sink=4, window=1000, compress_every=64,
                     kv_dtype="int8", position_mode="absolute"), 5000, 1500),
        (CacheConfig(policy="window", sink=0, window=777, compress_every=5), 2000, 1000),
        (CacheConfig(policy="dense", max_len=4096), 1000, 3000),
    ]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for Hq, Hkv, D in spec_heads:
        for cfg, t0, T in cases:
            c = make_cache(cfg, Spec(Hkv, D), torch.bfloat16, "cuda")
            for buf in (c.storage.k, c.storage.v):
                if buf.dtype == torch.int8:
                    buf.copy_(torch.randint(-127, 128, buf.shape, device="cuda",
                                            generator=gen, dtype=torch.int8))
                else:
                    buf.copy_(torch.randn(buf.shape, device="cuda", generator=gen))
            if cfg.kv_dtype == "int8":
                c.storage.k_scale.uniform_(0.005, 0.02)
                c.storage.v_scale.uniform_(0.005, 0.02)
            plan = c.plan_prefill(t0, T)
            q, qs = (2 * torch.randn(Hq, T, D, device="cuda", generator=gen).bfloat16()
                     for _ in range(2))
            kv = c.update(0, torch.randn(Hkv, T, D, device="cuda", generator=gen).bfloat16(),
                          torch.randn(Hkv, T, D, device="cuda", generator=gen).bfloat16(), plan)
            qs = qs if c.sink else None
            o = A.attend(q, qs, kv, plan, c.sink, flash=True)
            t_flash = time_ms(lambda a=(q, qs, kv, plan, c.sink, True): A.attend(*a), 3)["median"]
            r = A.attend(q, qs, kv, plan, c.sink)
            t_ref = time_ms(lambda a=(q, qs, kv, plan, c.sink): A.attend(*a), 3)["median"]
            row = {"heads": [Hq, Hkv, D], "cache": cfg.to_dict(), "t0": t0, "T": T,
                   "rel_err": rel(o, r), "flash_ms": t_flash, "reference_ms": t_ref,
                   "flash_nan": bool(o.isnan().any()), "reference_nan": bool(r.isnan().any())}
            out.append(row)
            print(f"check {Hq}/{Hkv}x{D} {cfg.policy} S{c.sink} W{c.window} "
                  f"R{c.compress_every} {cfg.kv_dtype} {cfg.position_mode} t0={t0} T={T}: "
                  f"rel {row['rel_err']:.2e}  flash {t_flash:.3f} ms  ref {t_ref:.3f} ms",
                  flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--parts", default=",".join(PARTS), help=f"sections, of {PARTS}")
    ap.add_argument("--sweep", default="default",
                    help=f"launch configurations to sweep: {sorted(SWEEPS)} or BM/BN/W/S,...")
    ap.add_argument("--sweep-lengths", default="4096")
    ap.add_argument("--config", default=None, help="BM/BN/W/S: the kernel's launch config")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    parts = set(args.parts.split(","))
    if args.no_sweep:
        parts.discard("sweep")
    if args.no_hf:
        parts.discard("hf")
    if parts - set(PARTS):
        ap.error(f"unknown parts {sorted(parts - set(PARTS))}")
    path = args.json or os.path.join(os.environ.get("OUT", "."), "gpu_prefill.json")

    from fastdecode.bench import tpot
    from fastdecode.cache import CacheConfig
    from fastdecode.engine import Decoder
    from fastdecode.eval.ppl import EvalSpec, evaluate
    from fastdecode.kernels import flash_prefill as FP
    from fastdecode.models import load_model

    t_all = time.perf_counter()
    rec: dict = {"kind": "fastdecode.gpu_prefill", "env": tpot.env_info(torch.device("cuda")),
                 "parts": sorted(parts)}
    config = FP.launch_config("cuda")  # the dict the kernel reads: updated in place
    if args.config:
        config.update(parse_configs(args.config)[0])
    default_config = dict(config)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rec, f, indent=1, default=str)

    lm = load_model("pythia-2.8b", dtype=torch.bfloat16, device="cuda", random_weights=True)
    spec = lm.spec
    params = sum(p.numel() for p in lm.model.parameters())
    rec["params"] = params
    stream = CacheConfig(policy="streaming", sink=4, window=2048)
    print(f"pythia-2.8b random bf16: {params / 1e9:.3f} B params; "
          f"{torch.cuda.get_device_name()}", flush=True)

    # (c) matmul rate
    def mm_rate():
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = time_ms(lambda: torch.mm(a, b), 10, warm=3)
        return {"n": n, "ms": t["median"], "tflops": 2 * n ** 3 / t["median"] / 1e9}
    section("matmul", rec, mm_rate)
    rate = rec["matmul"].get("tflops", 700.0) * 1e12
    print(f"bf16 matmul rate {rate / 1e12:.0f} TFLOP/s", flush=True)

    # (a) correctness
    if "checks" in parts:
        section("kernel_checks", rec, lambda: kernel_checks([(32, 32, 80), (32, 8, 64)]))

    def model_check():
        prompt = tpot.random_prompt(2048, spec.vocab_size, 1, "cuda")
        out = {}
        for kernel in ("flash", "reference"):
            dec = Decoder.build(lm.model, CacheConfig(policy="streaming", sink=4,
                                                      window=1000, compress_every=8),
                                chunk_size=700, prefill_kernel=kernel)
            out[kernel] = dec.prefill(prompt, all_logits=True).float()
            out[kernel + "_k"] = dec.cache.k.float()
        return {"logits_rel_err": rel(out["flash"], out["reference"]),
                "cache_k_rel_err": rel(out["flash_k"], out["reference_k"]),
                "argmax_agree": float((out["flash"].argmax(-1) ==
                                       out["reference"].argmax(-1)).float().mean())}
    if "checks" in parts:
        section("model_check", rec, model_check)
        print(f"model check: {rec['model_check']}", flush=True)
    save()

    def prefill_fn(cfg, prompt, kernel="auto"):
        dec = Decoder.build(lm.model, cfg, prefill_kernel=kernel)

        def run():
            dec.reset()
            return dec.prefill(prompt)
        return run

    # launch configurations: each against the card's default, per length; the run keeps
    # the default (what users get), the record says which was fastest
    def sweep():
        out = {"default": default_config, "lengths": {}}
        cands = [default_config] + [c for c in parse_configs(args.sweep) if c != default_config]
        for T in (int(x) for x in args.sweep_lengths.split(",")):
            prompt = tpot.random_prompt(T, spec.vocab_size, 2, "cuda")
            rows = []
            for c in cands:
                config.update(c)
                try:
                    t = time_ms(prefill_fn(stream, prompt), args.reps)
                    rows.append({"config": dict(c), "ms": t["median"]})
                    tag = "/".join(str(v) for v in c.values())
                    print(f"sweep T={T} {tag}: {t['median']:.2f} ms", flush=True)
                except Exception as e:  # noqa: BLE001 - a config the card cannot run
                    rows.append({"config": dict(c), "error": f"{type(e).__name__}: {e}"[:500]})
                    print(f"sweep T={T} {c}: FAILED {type(e).__name__}", flush=True)
            config.update(default_config)
            ok = [r for r in rows if "ms" in r]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            out["lengths"][T] = {"rows": rows, "best": best}
            if best:
                print(f"SWEEP T={T}: best {best['config']} {best['ms']:.2f} ms, default "
                      f"{rows[0].get('ms', float('nan')):.2f} ms", flush=True)
        return out
    if "sweep" in parts:
        section("sweep", rec, sweep)
    rec["config"] = dict(config)
    save()

    # (b) prefill times
    def ours():
        rows = []
        for T in lengths:
            prompt = tpot.random_prompt(T, spec.vocab_size, T, "cuda")
            for name, cfg in (("streaming-4+2048", stream),
                              ("dense", CacheConfig(policy="dense", max_len=T))):
                try:
                    t = time_ms(prefill_fn(cfg, prompt), args.reps)
                    r = {"T": T, "cache": name, "ms": t["median"], "all": t["all"],
                         "floor_ms": 2 * params * T / rate * 1e3}
                    r["vs_floor"] = r["ms"] / r["floor_ms"]
                except Exception as e:  # noqa: BLE001
                    r = {"T": T, "cache": name, "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(r)
                print(f"ours {name} T={T}: {r.get('ms', float('nan')):.1f} ms "
                      f"(floor {r.get('floor_ms', float('nan')):.1f})", flush=True)
                torch.cuda.empty_cache()
        return rows
    if "ours" in parts:
        section("ours", rec, ours)
    save()

    # (b') A/B in one process: queries rotated inside the flash kernel ("flash") or by
    # prefill_rope before it ("flash-q-rope"), streaming 4+2048, interleaved rounds
    def ab():
        rows = []
        for T in lengths:
            prompt = tpot.random_prompt(T, spec.vocab_size, T, "cuda")
            runs = {k: prefill_fn(stream, prompt, k) for k in ("flash", "flash-q-rope")}
            times = {k: [] for k in runs}
            for _ in range(3):
                for k, fn in runs.items():
                    times[k].append(time_ms(fn, args.reps)["median"])
            r = {"T": T, **{k: statistics.median(v) for k, v in times.items()},
                 "rounds": times}
            r["q_rope_over_kernel"] = r["flash-q-rope"] / r["flash"]
            rows.append(r)
            print(f"ab T={T}: q in kernel {r['flash']:.1f} ms, q by prefill_rope "
                  f"{r['flash-q-rope']:.1f} ms (x{r['q_rope_over_kernel']:.3f})", flush=True)
            del runs
            torch.cuda.empty_cache()
        return rows
    if "ab" in parts:
        section("ab", rec, ab)
    save()

    def profile16k(kernel="auto"):
        from torch.profiler import ProfilerActivity, profile

        T = max(lengths)
        prompt = tpot.random_prompt(T, spec.vocab_size, T, "cuda")
        run = prefill_fn(stream, prompt, kernel)
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        kern: dict = {}
        spans = []
        for ev in prof.events():
            if "CUDA" not in str(getattr(ev, "device_type", "")):
                continue
            k = kern.setdefault(ev.name, [0.0, 0])
            k[0] += ev.time_range.elapsed_us() / 1e3
            k[1] += 1
            spans.append((ev.time_range.start, ev.time_range.end, ev.name[:60]))
        # the device timeline: its span, and the idle gaps between kernels (launch-bound
        # stretches or host syncs), the largest with the kernels either side
        spans.sort()
        gaps, end, last = [], spans[0][1] if spans else 0, spans[0][2] if spans else ""
        for s1, e1, n1 in spans[1:]:
            if s1 > end:
                gaps.append(((s1 - end) / 1e3, last, n1))
            if e1 > end:
                end, last = e1, n1
        timeline = {"span_ms": (end - spans[0][0]) / 1e3 if spans else 0.0,
                    "idle_ms": sum(g[0] for g in gaps), "gaps": len(gaps),
                    "largest": [{"ms": g, "after": a, "before": b}
                                for g, a, b in sorted(gaps, reverse=True)[:12]]}

        def cat(n):
            low = n.lower()
            if "flash_prefill" in low:
                return "attention"
            if any(s in low for s in ("gemm", "nvjet", "cutlass", "sm90", "xmma", "cublas")):
                return "matmul"
            if "layer_norm" in low:
                return "norm"
            if "prefill_rope" in low:
                return "rotary"
            if "gelu" in low:
                return "gelu"
            if any(s in low for s in ("cat", "index", "scatter", "copy")):
                return "copy/cache"
            return "elementwise/other"
        cats: dict = {}
        for n, (ms, _) in kern.items():
            cats[cat(n)] = cats.get(cat(n), 0.0) + ms
        top = sorted(kern.items(), key=lambda kv: -kv[1][0])[:15]
        return {"T": T, "kernel": kernel, "by_category_ms": cats, "timeline": timeline,
                "kernel_ms": sum(v[0] for v in kern.values()),
                "top": [{"name": n[:120], "ms": ms, "calls": c} for n, (ms, c) in top]}
    if "profile" in parts:
        section("profile", rec, profile16k)
        print(f"profile 16k by category (ms): {rec['profile'].get('by_category_ms')}; "
              f"timeline {rec['profile'].get('timeline')}", flush=True)
    if "ab" in parts:  # the other query layout's profile beside the default's
        section("profile_q_rope", rec, lambda: profile16k("flash-q-rope"))
        print(f"profile 16k flash-q-rope (ms): "
              f"{rec['profile_q_rope'].get('by_category_ms')}; "
              f"timeline {rec['profile_q_rope'].get('timeline')}", flush=True)
    save()

    # (d) PPL evaluator
    def ppl():
        ids = tpot.random_prompt(8193, spec.vocab_size, 5, "cuda")
        spec_new = EvalSpec(mode="streaming", sink=4, window=2048)
        spec_old = EvalSpec(mode="streaming", sink=4, window=2048, chunk_size=512,
                            prefill_kernel="reference")
        out = {}
        for name, sp in (("old", spec_old), ("new", spec_new)):
            evaluate(lm.model, ids[:1025], sp)  # warm
            res = [evaluate(lm.model, ids, sp) for _ in range(2)]
            out[name] = {"seconds": min(r.seconds for r in res), "ppl": res[0].ppl,
                         "chunk": sp.chunk_for("cuda")}
        out["speedup"] = out["old"]["seconds"] / out["new"]["seconds"]
        out["ppl_rel_diff"] = abs(out["new"]["ppl"] / out["old"]["ppl"] - 1)
        return out
    if "ppl" in parts:
        section("ppl", rec, ppl)
        print(f"ppl: {rec['ppl']}", flush=True)
    save()

    # HF SDPA forward
    def hf():
        from transformers import DynamicCache

        from fastdecode.bench.peers import hf_model

        t0 = time.perf_counter()
        model = hf_model(spec, torch.bfloat16, torch.device("cuda"))
        rows = [{"build_s": time.perf_counter() - t0,
                 "attn_implementation": getattr(model.config, "_attn_implementation", None)}]
        for T in lengths:
            prompt = tpot.random_prompt(T, spec.vocab_size, T, "cuda")

            def run(model=model, prompt=prompt):
                return model(input_ids=prompt[None], past_key_values=DynamicCache(
                    config=model.config), use_cache=True, logits_to_keep=1)
            with torch.no_grad():
                t = time_ms(run, args.reps)
            rows.append({"T": T, "ms": t["median"], "all": t["all"]})
            print(f"hf sdpa T={T}: {t['median']:.1f} ms", flush=True)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
        return rows
    if "hf" in parts:
        section("hf", rec, hf)
    save()

    # table
    hf_rows = rec["hf"] if isinstance(rec.get("hf"), list) else []
    hf_ms = {r["T"]: r["ms"] for r in hf_rows if "T" in r and "ms" in r}
    ours_rows = rec["ours"] if isinstance(rec.get("ours"), list) else []
    print(f"\n{'T':>6s} {'stream 4+2048':>14s} {'dense':>9s} {'HF SDPA':>9s} {'floor':>8s}  (ms)")
    summary = []
    for T in lengths:
        s = next((r for r in ours_rows if r["T"] == T and r["cache"] != "dense"), {})
        d = next((r for r in ours_rows if r["T"] == T and r["cache"] == "dense"), {})
        nan = float("nan")
        row = {"T": T, "stream_ms": s.get("ms"), "dense_ms": d.get("ms"), "hf_ms": hf_ms.get(T),
               "floor_ms": 2 * params * T / rate * 1e3}
        summary.append(row)
        print(f"{T:6d} {s.get('ms', nan):14.1f} {d.get('ms', nan):9.1f} "
              f"{hf_ms.get(T, nan):9.1f} {row['floor_ms']:8.1f}")
    rec["summary"] = summary
    s4 = next((r for r in summary if r["T"] == 4096), None)
    s16 = next((r for r in summary if r["T"] == 16384), None)
    targets = {}
    if s4 and s4["stream_ms"] and s4["hf_ms"]:
        targets["4k_stream_vs_hf"] = s4["stream_ms"] / s4["hf_ms"]
    if s16 and s16["stream_ms"]:
        targets["16k_stream_vs_floor"] = s16["stream_ms"] / s16["floor_ms"]
    if isinstance(rec.get("ppl"), dict) and "speedup" in rec["ppl"]:
        targets["ppl_speedup"] = rec["ppl"]["speedup"]
    rec["targets"] = targets
    print(f"targets: {targets}  (want 4k <= 1.0, 16k <= 1.5, ppl >= 5)")
    rec["seconds"] = time.perf_counter() - t_all
    save()
    print(f"wrote {path} in {rec['seconds']:.0f} s")


if __name__ == "__main__":
    with torch.no_grad():
        main()
