"""Compare the latest benchmark run with a baseline of the same GPU class.

    python -m fastdecode.bench.compare --storage perf/history/h100 [--baseline FILE]
    python -m fastdecode.bench.compare --storage perf/history/h100 --record-baseline 3

Fails (exit 1) when a configuration got slower (TPOT), less accurate (PPL) or heavier
(peak memory) than the baseline by more than its noise margin (perf/budgets.toml:
``[meta].noise_margin``, overridable per configuration); improvements beyond the margin
are reported too. Without a baseline file, the previous run is the baseline. Only runs of
one GPU class are read (the newest run's, or ``--gpu``); files that are not valid runs, and
runs of other classes, are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ..atomic import check_output_file, write_json
from ..errors import FastdecodeError, InputError
from .history import METRICS, Run, load_history

LOWER_IS_BETTER = set(METRICS)


@dataclass
class Finding:
    config: str
    metric: str
    base: float
    new: float
    margin: float

    @property
    def change(self) -> float:
        return (self.new - self.base) / self.base if self.base else 0.0

    @property
    def verdict(self) -> str:
        if self.change > self.margin:
            return "regression"
        if self.change < -self.margin:
            return "improvement"
        return "same"

    def line(self) -> str:
        return (f"{self.verdict.upper():11s} {self.config:24s} {self.metric:11s} "
                f"{self.base:10.4g} -> {self.new:10.4g} ({self.change:+.1%}, margin "
                f"{self.margin:.1%})")


def load_budgets(path: str | Path) -> dict:
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"budgets file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None


def margin_for(budgets: dict, gpu: str, config: str) -> float:
    default = budgets.get("meta", {}).get("noise_margin", 0.03)
    return budgets.get(gpu, {}).get(config, {}).get("noise_margin", default)


def mean_baseline(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per configuration and metric, the mean over the given runs (where present)."""
    out: dict[str, dict[str, float]] = {}
    configs = {c for r in runs for c in r.results}
    for c in sorted(configs):
        out[c] = {}
        for m in METRICS:
            vals = [r.results[c][m] for r in runs if c in r.results and m in r.results[c]]
            if vals:
                out[c][m] = statistics.fmean(vals)
    return out


def compare(latest: Run, baseline: dict[str, dict[str, float]], budgets: dict) -> list[Finding]:
    findings = []
    for config, metrics in sorted(latest.results.items()):
        base = baseline.get(config)
        if not base:
            continue
        for m in METRICS:
            if m in metrics and m in base:
                findings.append(Finding(config, m, base[m], metrics[m],
                                        margin_for(budgets, latest.gpu, config)))
    return findings


def read_baseline(path: Path, gpu: str) -> dict[str, dict[str, float]]:
    """A baseline file written by ``--record-baseline``, validated: InputError naming the
    file for anything else, or for a baseline of another GPU class."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read baseline {path}: {e}") from None
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict) or not all(
            isinstance(m, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in m.values()) for m in configs.values()):
        raise InputError(f"baseline {path} is malformed: expected {{\"gpu\": ..., \"configs\": "
                         "{config: {metric: number}}} (write one with --record-baseline N)")
    if data.get("gpu") not in (None, gpu):
        raise InputError(f"baseline {path} is for GPU class {data['gpu']}, the runs compared "
                         f"are {gpu}")
    return {c: {k: float(v) for k, v in m.items()} for c, m in configs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdecode.bench.compare",
                                 description=__doc__.split("\n")[1])
    ap.add_argument("--storage", required=True, help="perf/history/<gpu class>")
    ap.add_argument("--gpu", default=None, metavar="CLASS",
                    help="GPU class compared (default: the newest run's); runs of other "
                         "classes are skipped and listed")
    ap.add_argument("--budgets", default="perf/budgets.toml")
    ap.add_argument("--baseline", default=None, help="baseline JSON (default: "
                    "perf/baselines/<gpu class>.json if present, else the previous run)")
    ap.add_argument("--record-baseline", type=int, metavar="N", default=None,
                    help="write the mean of the last N runs (1 <= N <= runs available) as "
                         "the baseline and exit")
    args = ap.parse_args(argv)
    try:
        hist = load_history(args.storage, args.gpu)
        for line in hist.report_skipped():
            print(line)
        runs, gpu = hist.runs, hist.gpu
        if not runs:
            raise InputError(f"no usable runs of GPU class {gpu} under {args.storage}")
        default_base = Path("perf/baselines") / f"{gpu}.json"
        if args.record_baseline is not None:
            n = args.record_baseline
            if not 1 <= n <= len(runs):
                raise InputError(f"--record-baseline N must be in 1..{len(runs)} (the {gpu} "
                                 f"runs under {args.storage}), got {n}")
            chosen = runs[-n:]
            path = Path(args.baseline or default_base)
            check_output_file(path, "baseline file")
            write_json(path, {"gpu": gpu, "runs": [str(r.path) for r in chosen],
                              "configs": mean_baseline(chosen)}, what="baseline", indent=2)
            print(f"baseline: mean of {len(chosen)} {gpu} run(s) -> {path}")
            return 0
        budgets = load_budgets(args.budgets)
        base_path = Path(args.baseline) if args.baseline else default_base
        if args.baseline and not base_path.is_file():
            raise InputError(f"baseline {base_path} does not exist")
        if base_path.is_file():
            baseline = read_baseline(base_path, gpu)
            label = str(base_path)
        elif len(runs) >= 2:
            baseline, label = runs[-2].results, f"previous {gpu} run {runs[-2].path.name}"
        else:
            print(f"only one {gpu} run under {args.storage} and no baseline file: nothing to "
                  "compare")
            return 0
    except FastdecodeError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    findings = compare(runs[-1], baseline, budgets)
    print(f"latest {runs[-1].path.name} (commit {runs[-1].commit or '?'}) vs {label}")
    for f in findings:
        print(f.line())
    bad = [f for f in findings if f.verdict == "regression"]
    print(f"{len(bad)} regression(s), "
          f"{sum(f.verdict == 'improvement' for f in findings)} improvement(s), "
          f"{len(findings)} comparison(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
