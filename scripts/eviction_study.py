"""The eviction Pareto study (fastdecode.eval.eviction): PPL of every eviction policy at
equal cache budgets on SmolLM2-135M, one resumable record per configuration, then the
markdown table and the plot from all the records found (with a TPOT record of
scripts/eviction_tpot.py: TPOT-PPL).

    python scripts/eviction_study.py --budgets 256 512 1024 --books pg19-10146 \\
        --tokens 8192 --out perf/results [--policies streaming refresh ...]
    python scripts/eviction_study.py --model /tmp/fd/smollm2.gguf --device cuda \\
        --dtypes float32 bfloat16 --time-limit 280      # the whole study on a GPU

Run it again after an interruption: finished configurations are skipped (their records
exist); ``--report-only`` makes the table and plots from the records without evaluating
(``--plot`` PPL against the budget; with a TPOT record also ``<plot>-tpot.png``, PPL
against TPOT for the policies it timed).
``--random-weights``: a SmolLM2-135M-shaped model with random weights and the book's
GPT-NeoX token ids modulo its vocabulary (a timing check where the GGUF is not at hand).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastdecode.config import parse_dtype
from fastdecode.eval import eviction


def random_smollm2(dtype, device):
    """SmolLM2-135M's shapes (its GGUF's), random weights, the GPT-NeoX tokenizer."""
    import torch

    from fastdecode.models import LoadedModel, weights
    from fastdecode.models.presets import NEOX_TOKENIZER
    from fastdecode.models.spec import ModelSpec
    from fastdecode.models.tokenizer import Tokenizer
    from fastdecode.models.transformer import Transformer

    spec = ModelSpec(family="llama", vocab_size=49152, hidden_size=576, num_layers=30,
                     num_heads=9, num_kv_heads=3, intermediate_size=1536, rotary_dim=64,
                     rope_theta=100000.0, norm_eps=1e-5, max_position=8192,
                     tie_embeddings=True).validate()
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to_empty(device=device).to(dtype)
    model.load_canonical(weights.random_state(spec, seed=0, dtype=dtype, device=device))
    model.eval().requires_grad_(False)
    return LoadedModel(spec, model, Tokenizer.from_file(NEOX_TOKENIZER), "random:smollm2-135m")


def token_check(lm, a, out: Path, dtype: str, ids_for) -> None:
    """Token by token (graphed on CUDA) against parallel (streaming, refresh) or the eager
    step (H2O, TOVA), the same tokens: the PPLs agree."""
    import dataclasses

    from fastdecode.atomic import write_json
    from fastdecode.eval import evaluate
    from fastdecode.eval.run import prepare_tokens

    book = a.books[0]
    ids, _ = ids_for(book) if ids_for else prepare_tokens(lm, book, a.token_check)
    ids = ids[:a.token_check + 1]
    rows = []
    specs = eviction.configs([min(a.budgets)], ["streaming", "refresh"])
    score = [x for x in specs if x.mode == "refresh" and x.options["refresh_select"] == "score"]
    scored = eviction.configs([min(a.budgets)], ["h2o", "tova"])
    path = out / f"{eviction.device_prefix(lm.model.device)}-eviction-token-check-{dtype}.json"
    for spec in scored + specs[:1] + score[:1]:  # refresh compiles (torch.compile): last
        if spec.mode in ("h2o", "tova"):  # the graphed step against the eager one
            par = evaluate(lm.model, ids, spec, step="none")
        else:
            par = evaluate(lm.model, ids, spec)
        tok = evaluate(lm.model, ids, dataclasses.replace(spec, method="token"))
        rel = abs(tok.ppl / par.ppl - 1)
        rows.append({"label": spec.label, "reference": par.info.get("step", "parallel"),
                     "reference_ppl": par.ppl, "token_ppl": tok.ppl,
                     "rel": rel, "token_s": tok.seconds, "reference_s": par.seconds,
                     "step": tok.info.get("step")})
        print(f"token check {dtype} {spec.label}: {rows[-1]['reference']} {par.ppl:.4f} "
              f"token {tok.ppl:.4f} "
              f"(rel {rel:.2e}, {tok.info.get('step')}, {tok.seconds:.1f} s)", flush=True)
        write_json(path, {"kind": "fastdecode.eviction_token_check", "tokens": a.token_check,
                          "book": book, "dtype": dtype, "rows": rows}, what="token check")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or its GGUF's path")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budgets", type=int, nargs="+", default=list(eviction.BUDGETS))
    p.add_argument("--books", nargs="+", default=list(eviction.BOOKS))
    p.add_argument("--policies", nargs="+", default=list(eviction.POLICIES),
                   choices=eviction.POLICIES)
    p.add_argument("--recompute-budgets", type=int, nargs="*", default=None,
                   help="recompute at these budgets only (default: all of --budgets)")
    p.add_argument("--recompute-dtypes", nargs="*", default=None,
                   help="recompute in these dtypes only (default: all of --dtypes)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtypes", "--dtype", nargs="+", default=["float32"])
    p.add_argument("--out", default="perf/results")
    p.add_argument("--tpot", default=None, help="an eviction_tpot record (default: the "
                   "newest *-eviction-tpot*.json in --out)")
    p.add_argument("--plot", default="docs/eviction-ppl.png")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no configuration after them (resume later)")
    p.add_argument("--token-check", type=int, default=0, metavar="N",
                   help="after the study (the last dtype): the first N tokens of the "
                   "first book through streaming, refresh (score, R = B/4), H2O and TOVA at "
                   "the smallest budget token by token (on CUDA one graph a step) against "
                   "the parallel evaluator or the eager step; record "
                   "<class>-eviction-token-check-<dtype>.json in --out")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    start = time.monotonic()
    deadline = start + a.time_limit if a.time_limit else None
    out = Path(a.out)
    if not a.report_only:
        from fastdecode.models import load_model

        for dtype in a.dtypes:
            dt = parse_dtype(dtype)
            lm = (random_smollm2(dt, a.device) if a.random_weights
                  else load_model(a.model, dtype=dt, device=a.device))
            ids_for = None
            if a.random_weights:
                from fastdecode.eval.run import prepare_tokens

                def ids_for(book, lm=lm):
                    ids, data = prepare_tokens(lm, book, a.tokens)
                    return [i % lm.spec.vocab_size for i in ids], dict(data, random=True)
            for B in a.budgets:
                specs = eviction.configs([B], [x for x in a.policies if x != "recompute"])
                if ("recompute" in a.policies
                        and B in (a.recompute_budgets or a.budgets)
                        and dtype in (a.recompute_dtypes or a.dtypes)):
                    specs += eviction.configs([B], ["recompute"])
                eviction.run(lm, specs, books=a.books, tokens=a.tokens, out=out, dtype=dtype,
                             progress=not a.no_progress, deadline=deadline, ids_for=ids_for,
                             model_name=lm.source)
            if a.token_check and dtype == a.dtypes[-1]:
                if deadline is None or time.monotonic() < deadline:
                    token_check(lm, a, out, dtype, ids_for)
                else:
                    print("token check: past the time limit, not run")
            del lm
        print(f"study wall {time.monotonic() - start:.1f} s")
    records = eviction.load_records(sorted(out.glob("*-eviction-*.json")))
    records = [r for r in records if r.get("config", {}).get("study") == "eviction"]
    tpots = [Path(a.tpot)] if a.tpot else sorted(out.glob("*-eviction-tpot*.json"))
    tpot = json.loads(tpots[-1].read_text()) if tpots else None
    print(eviction.table(records, tpot))
    if records and a.plot:  # PPL against the budget (every policy), and against TPOT
        print(f"plot: {eviction.plot(records, a.plot)}")
        if tpot:
            tp = Path(a.plot).with_name(Path(a.plot).stem + "-tpot.png")
            print(f"plot: {eviction.plot(records, tp, tpot)}")


if __name__ == "__main__":
    main()
