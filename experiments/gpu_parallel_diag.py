"""Why did a parallel PPL configuration take 22 s for 1,024 tokens on the H200
(perf/results/h200-eviction-check-90b8e8d.json)? Each configuration twice in one process,
fp32 and bf16, random SmolLM2-135M-shaped weights: a per-process compile shows as a slow
first run and a fast second; cProfile of the first run says where the time went.

    PYTHONPATH=src:scripts python experiments/gpu_parallel_diag.py --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from fastdecode.eval import EvalSpec, evaluate
from fastdecode.eval.run import prepare_tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = p.parse_args()
    from eviction_study import random_smollm2

    for dtype in a.dtypes:
        lm = random_smollm2(getattr(torch, dtype), a.device)
        ids, _ = prepare_tokens(lm, "pg19-10146", a.tokens)
        ids = [i % lm.spec.vocab_size for i in ids]
        for spec in (EvalSpec(mode="streaming", sink=4, window=252),
                     EvalSpec(mode="window", sink=0, window=256)):
            for rep in range(2):
                prof = cProfile.Profile() if rep == 0 else None
                t0 = time.perf_counter()
                if prof:
                    prof.enable()
                r = evaluate(lm.model, ids, spec)
                if prof:
                    prof.disable()
                wall = time.perf_counter() - t0
                print(f"diag {dtype} {spec.label} run {rep}: wall {wall:.2f} s, "
                      f"evaluate {r.seconds:.2f} s, ppl {r.ppl:.2f}", flush=True)
                if prof:
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
                    print("\n".join(s.getvalue().splitlines()[6:22]), flush=True)
        del lm


if __name__ == "__main__":
    main()
