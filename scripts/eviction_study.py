"""The eviction Pareto study (fastdecode.eval.eviction): PPL of every eviction policy at
equal cache budgets on SmolLM2-135M, one resumable record per configuration, then the
markdown table and the budget-PPL plot from all the records found.

    python scripts/eviction_study.py --budgets 256 512 1024 --books pg19-10146 \\
        --tokens 8192 --out perf/results [--policies streaming refresh ...]

Run it again after an interruption: finished configurations are skipped (their records
exist); ``--report-only`` makes the table and plot from the records without evaluating.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdecode.config import parse_dtype
from fastdecode.eval import eviction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=list(eviction.BUDGETS))
    p.add_argument("--books", nargs="+", default=list(eviction.BOOKS))
    p.add_argument("--policies", nargs="+", default=list(eviction.POLICIES),
                   choices=eviction.POLICIES)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="perf/results")
    p.add_argument("--plot", default="docs/eviction-ppl.png")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    specs = eviction.configs(a.budgets, a.policies)
    out = Path(a.out)
    if not a.report_only:
        from fastdecode.models import load_model

        lm = load_model("smollm2-135m", dtype=parse_dtype(a.dtype))
        eviction.run(lm, specs, books=a.books, tokens=a.tokens, out=out, dtype=a.dtype,
                     progress=not a.no_progress)
    records = eviction.load_records(sorted(out.glob("cpu-eviction-*.json")))
    print(eviction.table(records))
    if records and a.plot:
        print(f"plot: {eviction.plot(records, a.plot)}")


if __name__ == "__main__":
    main()
