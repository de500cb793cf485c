"""Same-run TPOT of StreamingLLM 4+2048 against H2O (sink 4 + heavy 1024 + recent 1024,
the same 2052 slots) on Pythia-2.8B shapes with random weights, per weight format, fused
step + CUDA graphs: issue 20's speed target is H2O <= 1.05x streaming's TPOT in each.

One process, one model per format, the two caches measured alternately ``--rounds`` times
(the median-TPOT run of each kept), the cache full throughout (prompt = 2052 tokens).
Runs on the CPU too, for a check at toy sizes (``--model tiny-neox --device cpu --compile
none``)::

    python scripts/gpu_h2o_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

from fastdecode.bench import team, tpot
from fastdecode.cache import CacheConfig
from fastdecode.models import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pythia-2.8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", default="graphs")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--recipes", default="bf16,int8,int4-mlp-g128",
                   help="weight formats: bf16 (the model dtype) or a quantization recipe")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=2048, help="streaming window; H2O splits "
                   "it into heavy = recent = window / 2")
    p.add_argument("--prompt-len", type=int, default=None, help="default: sink + window")
    p.add_argument("--decode-len", type=int, default=256)
    p.add_argument("--warmup-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target", type=float, default=1.05, help="H2O / streaming TPOT at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    lm = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    heavy = a.window // 2
    stream = CacheConfig(policy="streaming", sink=a.sink, window=a.window)
    h2o = CacheConfig(policy="h2o", sink=a.sink, heavy=heavy, recent=a.window - heavy)
    rows = []
    for r in a.recipes.split(","):
        quant = None if r in ("bf16", a.dtype) else r
        rows += [(f"{r} streaming {a.sink}+{a.window}", quant, stream),
                 (f"{r} h2o {a.sink}+{heavy}+{a.window - heavy}", quant, h2o)]
    prompt_len = a.prompt_len or a.sink + a.window
    out = team.run_rows(lm, rows, mode=a.compile, kernels=a.kernels, prompt_len=prompt_len,
                        decode_len=a.decode_len, warmup_tokens=a.warmup_tokens, seed=a.seed,
                        rounds=a.rounds)
    ratios = {}
    for (sl, _, _), (hl, _, _) in zip(rows[::2], rows[1::2]):
        if "tpot_ms" in out.get(sl, {}) and "tpot_ms" in out.get(hl, {}):
            x = out[hl]["tpot_ms"]["median"] / out[sl]["tpot_ms"]["median"]
            ratios[hl] = {"vs": sl, "ratio": x, "target": a.target, "met": x <= a.target}
    record = {"kind": "fastdecode.h2o_bench", "version": 1,
              "command": " ".join(["python", *sys.argv]), "args": vars(a),
              "env": tpot.env_info(lm.model.device), "rows": out, "ratios": ratios}
    if a.json:
        tpot.write_json(a.json, record)
    print()
    for line in team.table(out):
        print(line)
    for hl, r in ratios.items():
        print(f"{hl} / {r['vs']}: x{r['ratio']:.3f} (target <= {r['target']}: "
              f"{'met' if r['met'] else 'MISSED'})")
    failed = [k for k, v in out.items() if "error" in v] + [k for k, _, _ in rows
                                                              if k not in out]
    if failed:
        print("failed:", json.dumps(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
