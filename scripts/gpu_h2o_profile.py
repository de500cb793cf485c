"""Per-kernel device time of one graphed decode step, StreamingLLM 4+2048 beside H2O
4+1024+1024 (Pythia-2.8B shapes, random weights, bf16, fused + CUDA graphs): where
``scripts/gpu_h2o_bench.py``'s TPOT gap comes from, kernel by kernel (torch.profiler over
graph replays; PDL off by default, so no kernel's time includes waiting for the one before
it)::

    python scripts/gpu_h2o_profile.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pythia-2.8b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pdl", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastdecode.bench import tpot
    from fastdecode.cache import CacheConfig
    from fastdecode.fused import FusedOptions
    from fastdecode.models import load_model

    lm = load_model(a.model, dtype=torch.bfloat16, device="cuda")
    caches = {"streaming 4+2048": CacheConfig(policy="streaming", sink=4, window=2048),
              "h2o 4+1024+1024": CacheConfig(policy="h2o", sink=4, heavy=1024, recent=1024)}
    prompt = tpot.random_prompt(2052, lm.spec.vocab_size, 0, "cuda")
    out = {}
    for label, cfg in caches.items():
        dec, step, _ = tpot.build_and_compile(lm, cfg, "graphs",
                                              options=FusedOptions.from_env(pdl=bool(a.pdl)))
        dec.reset()
        dec.prefill(prompt)
        dec.tok_buf.fill_(0)
        dec.pos_buf.fill_(dec.t)
        for _ in range(4):
            step.run_one()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step.run_one()
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.time_range.elapsed_us() / a.steps  # us a step
                per[e.name][1] += 1
        rows = sorted(((n, round(t, 2), c // a.steps) for n, (t, c) in per.items()),
                      key=lambda r: -r[1])
        out[label] = {"us_per_step": {n: t for n, t, _ in rows},
                      "launches_per_step": {n: c for n, _, c in rows},
                      "total_us": round(sum(t for _, t, _ in rows), 1)}
        print(label, "total", out[label]["total_us"], "us a step (kernel time summed)")
        for n, t, c in rows[:14]:
            print(f"  {t:9.1f} us  {c:4d}x  {n[:90]}")
        del dec, step
        torch.cuda.empty_cache()
    if a.json:
        record = {"kind": "fastdecode.h2o_profile", "version": 1,
                  "command": " ".join(["python", *sys.argv]), "args": vars(a),
                  "env": tpot.env_info(lm.model.device), "caches": out}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
