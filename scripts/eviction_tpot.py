"""TPOT of the eviction study's policies at its budgets (fastdecode.eval.eviction.configs),
on Pythia-2.8B shapes with random weights, bf16, CUDA graphs: the fused step for
streaming/window/H2O/TOVA, torch.compile's step for refresh (the fused step does not run
it; compile.resolve_kernels), and recompute as the time of re-encoding its B + 1 tokens
(one flash prefill from an empty dense cache per token, median of ``--rounds``). One
record, rows (policy, budget, tpot_ms, path) for the study's TPOT-PPL table and plot::

    python scripts/eviction_tpot.py --json OUT/h200-eviction-tpot.json

``--refresh-budgets`` limits refresh (one torch.compile per row, ~tens of seconds each).
CPU check at toy sizes: ``--model tiny-llama --device cpu --compile none``.
"""

from __future__ import annotations

import argparse
import sys
import time

from fastdecode.bench import team, tpot
from fastdecode.cache import CacheConfig
from fastdecode.eval import eviction


def recompute_ms(lm, budget: int, rounds: int, seed: int) -> float:
    """Median time of one recompute step: a B + 1 token prefill from an empty cache."""
    import torch

    from fastdecode.engine import Decoder

    dev = lm.model.device
    dec = Decoder.build(lm.model, CacheConfig(policy="dense", sink=0, max_len=budget + 1))
    prompt = tpot.random_prompt(budget + 1, lm.spec.vocab_size, seed, dev)
    clock = tpot.Clock(dev)
    times = []
    for _ in range(rounds + 1):  # the first compiles the prefill kernels for the shape
        dec.reset()
        _, ms = clock.timed(lambda d=dec: d.prefill(prompt))
        times.append(ms)
    del dec
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pythia-2.8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", default="graphs")
    p.add_argument("--budgets", type=int, nargs="+", default=list(eviction.BUDGETS))
    p.add_argument("--policies", nargs="+", default=list(eviction.POLICIES),
                   choices=eviction.POLICIES)
    p.add_argument("--refresh-budgets", type=int, nargs="*", default=[1024],
                   help="refresh rows at these budgets only (each row compiles)")
    p.add_argument("--refresh-select", nargs="+", default=["score"])
    p.add_argument("--decode-len", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    start = time.perf_counter()
    from fastdecode.models import load_model

    lm = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    rows, meta = [], {}
    for B in a.budgets:
        for spec in eviction.configs([B], [x for x in a.policies if x != "recompute"]):
            o = spec.options or {}
            if spec.mode == "refresh" and (B not in (a.refresh_budgets or [])
                                           or o["refresh_select"] not in a.refresh_select):
                continue
            cfg = spec.cache_config(1)
            label = f"{eviction.policy_name(spec.mode, spec.options)} B={B}"
            rows.append((label, None, cfg))
            meta[label] = (eviction.policy_name(spec.mode, spec.options), B)
    rows.sort(key=lambda r: r[2].policy == "refresh")  # the compiled ones last
    out, recs = {}, []

    def save(partial: bool) -> dict:  # after every row: a timeout keeps the rows so far
        record = {"kind": "fastdecode.eviction_tpot", "version": 1,
                  "command": " ".join(["python", *sys.argv]), "args": vars(a),
                  "env": tpot.env_info(lm.model.device), "rows": recs, "bench": out,
                  "wall_s": round(time.perf_counter() - start, 1), "partial": partial}
        if a.json:
            tpot.write_json(a.json, record)
        return record

    for label, q, cfg in rows:  # one row at a time: each its own prompt (its steady state)
        extra = 2 * cfg.refresh_every if cfg.policy == "refresh" else 0
        res = team.run_rows(lm, [(label, q, cfg)], mode=a.compile, kernels="auto",
                            prompt_len=cfg.budget + extra, decode_len=a.decode_len,
                            warmup_tokens=a.warmup_tokens, seed=a.seed, rounds=1)
        out.update(res)
        for lab, r in res.items():
            name, B = meta[lab]
            recs.append({"policy": name, "budget": B, "label": lab,
                         "tpot_ms": r.get("tpot_ms", {}).get("median"),
                         "path": f"{r.get('mode', '')}:{r.get('kernels', '')}",
                         "compile_s": r.get("compile_s"), "error": r.get("error")})
        save(partial=True)
        print(f"  {time.perf_counter() - start:.0f} s so far", flush=True)
    if "recompute" in a.policies:
        for B in a.budgets:
            try:
                ms = recompute_ms(lm, B, a.rounds, a.seed)
                recs.append({"policy": "recompute", "budget": B, "label": f"recompute B={B}",
                             "tpot_ms": ms, "path": "prefill of B + 1 tokens"})
            except Exception as e:  # noqa: BLE001 - keep the others
                recs.append({"policy": "recompute", "budget": B, "tpot_ms": None,
                             "error": f"{type(e).__name__}: {e}"[:500]})
            save(partial=True)
    for r in recs:
        tp = f"{r['tpot_ms']:.3f} ms" if r["tpot_ms"] is not None else r.get("error")
        print(f"{r['label'] if 'label' in r else r['policy']}: {tp} ({r.get('path')})")
    record = save(partial=False)
    print(f"eviction tpot wall {record['wall_s']} s")
    return 1 if any(r.get("error") for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main())
