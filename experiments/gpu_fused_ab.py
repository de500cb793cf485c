"""A/B of the fused step's code paths on Pythia-2.8B shapes (run on a CUDA machine).

For each weight recipe, the same model and prompt decoded with the fused step captured as a
CUDA graph (``fastdecode bench``'s measurement: 4 + 2048 streaming, steady state, CUDA
events) under each setting (``--values``, default 0,1) of one field of ``FusedOptions``
(``--option``: ``pdl``, programmatic dependent launch; ``norm_in_gemv``, each norm inside
the GEMV after it; ``branches``, the MLP's up projection (1) or all of it (2) on a second
stream beside q/k/v and attention; ``priority``, the main chain captured at the highest
stream priority; ``asm``, the int8/int4 codes converted by inline PTX), interleaved over
``--rounds`` so that drift hits all alike; the tuner picks the other code paths, and what
it picked is in the record. None may change a result beyond rounding: the last greedy token
of each run is compared with the first variant's.

    PYTHONPATH=src python experiments/gpu_fused_ab.py --option pdl --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import torch

RECIPES = ("bf16", "int8", "int4-g128", "int4-mlp-g128")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-len", type=int, default=96)
    ap.add_argument("--option", default="pdl",
                    choices=("pdl", "norm_in_gemv", "branches", "priority", "asm"))
    ap.add_argument("--values", default="0,1",
                    help="the option's settings to compare (branches: 0,1,2)")
    ap.add_argument("--trace-dir", default=None,
                    help="also profile 3 graphed steps of each run: Chrome traces there")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fastdecode.bench import tpot
    from fastdecode.cache import CacheConfig
    from fastdecode.fused import FusedOptions, tune
    from fastdecode.models import load_model
    from fastdecode.quant import QuantConfig, quantize_model, set_backend

    cfg = CacheConfig(policy="streaming", sink=4, window=2048)
    out = {"commit": os.environ.get("FASTDECODE_GIT_COMMIT"),
           "device": torch.cuda.get_device_name(), "cache": cfg.to_dict(),
           "option": args.option, "results": {}}
    for recipe in args.recipes.split(","):
        lm = load_model("pythia-2.8b", dtype=torch.bfloat16, device="cuda",
                        random_weights=True)
        if recipe != "bf16":
            quantize_model(lm.model, QuantConfig.parse(recipe))
            set_backend(lm.model, "auto")
        prompt = tpot.random_prompt(2052, lm.spec.vocab_size, 0, "cuda")
        runs = {}
        for on in map(int, args.values.split(",")):
            value = on if args.option in ("norm_in_gemv", "branches") else bool(on)
            opts = FusedOptions.from_env(**{args.option: value})
            dec, step, secs = tpot.build_and_compile(lm, cfg, "graphs", kernels="fused",
                                                     options=opts)
            runs[f"{args.option}{on}"] = {"dec": dec, "step": step, "setup_s": secs, "tpot": [],
                                 "tokens": None}
        for _ in range(args.rounds):
            for r in runs.values():
                m = tpot.measure(r["step"], r["dec"], prompt=prompt,
                                 decode_len=args.decode_len, warmup_tokens=16)
                r["tpot"].append(m.tpot_ms["median"])
                toks = r["dec"].tok_buf.clone()  # the last greedy token of the run
                r["tokens"] = toks if r["tokens"] is None else r["tokens"]
        if args.trace_dir:
            for name, r in runs.items():
                tpot.profile_steps(r["step"].run_one, 3,
                                   f"{args.trace_dir}/trace-{recipe}-{name}.json.gz", "cuda")
        first = next(iter(runs.values()))
        res = {}
        for name, r in runs.items():
            med = statistics.median(r["tpot"])
            same = bool(torch.equal(r["tokens"], first["tokens"]))
            res[name] = {"tpot_ms_median_of_rounds": med, "rounds_ms": r["tpot"],
                         "setup_s": r["setup_s"], "last_token_equal_to_first": same}
            print(f"{recipe:14s} {name:10s} {med:7.3f} ms  rounds "
                  f"{' '.join(f'{t:.3f}' for t in r['tpot'])}  same-token {same}", flush=True)
        out["results"][recipe] = res
        del runs, first, lm
        gc.collect()
        torch.cuda.empty_cache()
    out["tuned_launches"] = tune.chosen()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
