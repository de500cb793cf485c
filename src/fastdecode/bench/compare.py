"""The latest perf suite run against its GPU class's baseline (fails on a regression beyond
the noise margin) and other classes in efficiencies (docs/gpu.md, "Budgets that hold on any GPU").

    python -m fastdecode.bench.compare --storage perf/history/h100 [--baseline FILE]
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
from . import budgets as bud
from .agreement import agreement
from .cross_figures import CROSS_METRICS, cross_figures
from .history import METRICS, Run, load_history, read_json


@dataclass
class Finding:
    config: str
    metric: str
    base: float
    new: float
    margin: float
    lower_is_better: bool = True

    @property
    def change(self) -> float:
        return (self.new - self.base) / self.base if self.base else 0.0

    @property
    def verdict(self) -> str:
        worse = self.change if self.lower_is_better else -self.change
        if worse > self.margin:
            return "regression"
        if worse < -self.margin:
            return "improvement"
        return "same"

    def line(self) -> str:
        return (f"{self.verdict.upper():11s} {self.config:24s} {self.metric:11s} "
                f"{self.base:10.4g} -> {self.new:10.4g} ({self.change:+.1%}, margin "
                f"{self.margin:.1%})")


def mean_baseline(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per configuration and figure, the mean over the given runs (where present)."""
    out: dict[str, dict[str, float]] = {}
    for c in sorted({c for r in runs for c in r.results}):
        names = sorted({m for r in runs for m in r.results.get(c, {})})
        out[c] = {m: statistics.fmean(r.results[c][m] for r in runs
                                      if m in r.results.get(c, {})) for m in names}
    return out


def compare(latest: Run, baseline: dict[str, dict[str, float]], budgets: dict,
            metrics=None, margin: float | None = None) -> list[Finding]:
    """Findings per configuration and figure (``metrics``: name -> lower is better; default
    TPOT, PPL and peak memory) with the configuration's noise margin, or ``margin``."""
    metrics = metrics or dict.fromkeys(METRICS, True)
    findings = []
    for config, figures in sorted(latest.results.items()):
        base = baseline.get(config)
        if not base:
            continue
        for m, lower in metrics.items():
            if m in figures and m in base:
                findings.append(Finding(config, m, base[m], figures[m],
                                        margin if margin is not None
                                        else bud.margin_for(budgets, latest.gpu, config), lower))
    return findings


def read_baseline(path: Path, gpu: str | None) -> dict[str, dict[str, float]]:
    """A ``--record-baseline`` file of class ``gpu`` (None: any), else InputError naming it."""
    data = read_json(path, "baseline")
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict) or not all(
            isinstance(m, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in m.values()) for m in configs.values()):
        raise InputError(f"baseline {path} is malformed: expected {{\"gpu\": ..., \"configs\": "
                         "{config: {metric: number}}} (write one with --record-baseline N)")
    if gpu is not None and data.get("gpu") not in (None, gpu):
        raise InputError(f"baseline {path} is for GPU class {data['gpu']}, the runs compared "
                         f"are {gpu} (--against {data['gpu']} reads them in efficiencies)")
    return {c: {k: float(v) for k, v in m.items()} for c, m in configs.items()}


def class_baseline(root: Path, gpu: str, baselines: Path, n: int = 3):
    """Another class's figures to read a run against: its baseline file, else the mean of
    its last ``n`` runs under ``root``. Returns (figures, label) or None."""
    path = baselines / f"{gpu}.json"
    if path.is_file():
        return read_baseline(path, gpu), str(path)
    runs = load_history(root, gpu).runs if root.is_dir() else []
    if not runs:
        return None
    chosen = runs[-n:]
    return mean_baseline(chosen), f"mean of the last {len(chosen)} {gpu} run(s) under {root}"


def cross_class(latest: Run, others: list[str], root: Path, baselines: Path,
                budgets: dict) -> list[str]:
    """Lines reading ``latest`` against each class in ``others`` in efficiencies, same-run
    ratios and PPL (report only)."""
    margin = budgets.get("meta", {}).get("cross_class_margin", 0.10)
    mine = Run(latest.path, latest.datetime, latest.commit, latest.gpu,
               cross_figures(latest.results, latest.gpu, budgets))
    lines = []
    for other in others:
        found = class_baseline(root / other, other, baselines)
        if found is None:
            lines.append(f"against {other}: no runs under {root / other} and no baseline file")
            continue
        base, label = found
        findings = compare(mine, cross_figures(base, other, budgets), budgets,
                           CROSS_METRICS, margin)
        lines.append(f"{latest.gpu} run {latest.path.name} against {other} ({label}), in "
                     f"efficiency, ratio to {bud.reference(budgets)} and PPL (margin "
                     f"{margin:.0%}; a reading, not a gate):")
        lines += ["  " + f.line() for f in findings]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdecode.bench.compare",
                                 description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--storage", required=True, help="perf/history/<gpu class>")
    ap.add_argument("--gpu", default=None, metavar="CLASS",
                    help="GPU class compared (default: the newest run's); runs of other "
                         "classes are skipped and listed")
    ap.add_argument("--budgets", default="perf/budgets.toml")
    ap.add_argument("--baseline", default=None, help="baseline JSON (default: "
                    "perf/baselines/<gpu class>.json if present, else the previous run)")
    ap.add_argument("--baselines", default="perf/baselines",
                    help="folder of the classes' baseline files")
    ap.add_argument("--record-baseline", type=int, metavar="N", default=None,
                    help="write the mean of the last N runs (1 <= N <= runs available) as "
                         "the baseline and exit")
    ap.add_argument("--suggest-budgets", action="store_true",
                    help="print [<class>.<config>] budgets for budgets.toml from the class's "
                         "baseline file (the rules in its [meta]) and exit")
    ap.add_argument("--against", default=None, metavar="CLASS[,CLASS]",
                    help="read the latest run against these classes' baselines or runs "
                         "(beside --storage) in efficiencies (default: every other class, "
                         "when this one has no baseline file and a single run)")
    ap.add_argument("--derive", default=None, metavar="CLASS",
                    help="print derived budgets for CLASS (TPOT from the efficiency budgets "
                         "at --copy-gbps; PPL and memory of the --storage class, bytes per "
                         "token from its latest run) and exit")
    ap.add_argument("--bench", default=None, metavar="JSON[,JSON]",
                    help="`fastdecode bench` records of this lease: each one's TPOT against "
                         "the latest suite run's for the registry configuration it matches; "
                         "fails beyond [meta].bench_agreement (3%%)")
    ap.add_argument("--copy-gbps", type=float, default=None,
                    help="with --derive: the copy bandwidth assumed for CLASS (GB/s)")
    args = ap.parse_args(argv)
    try:
        if args.derive and not (args.copy_gbps and args.copy_gbps > 0):
            raise InputError("--derive needs --copy-gbps > 0 (the bandwidth assumed)")
        hist = load_history(args.storage, args.gpu)
        for line in hist.report_skipped():
            print(line)
        runs, gpu = hist.runs, hist.gpu
        if not runs:
            raise InputError(f"no usable runs of GPU class {gpu} under {args.storage}")
        baselines = Path(args.baselines)
        default_base = baselines / f"{gpu}.json"
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
        budgets = bud.load_budgets(args.budgets)
        if args.suggest_budgets:
            path = Path(args.baseline or default_base)
            if not path.is_file():
                raise InputError(f"no baseline {path}: record one first (--record-baseline 3)")
            base = read_baseline(path, gpu)
            n = len(json.loads(path.read_text()).get("runs") or [])
            print(bud.toml_block(gpu, bud.from_baseline(base, budgets),
                                 f"mean of {n} {gpu} runs, {path}"))
            return 0
        if args.derive:
            rows = bud.derive_class(budgets, {c: m["bytes_per_token"] for c, m in
                                              runs[-1].results.items()
                                              if "bytes_per_token" in m},
                                    args.copy_gbps, gpu)
            print(f"[{args.derive}]\nderived = true\n")
            print(bud.toml_block(args.derive, rows, f"derived at {args.copy_gbps:g} GB/s"))
            return 0
        if args.bench:
            return agreement(runs[-1], args.bench.split(","), budgets)
        base_path = Path(args.baseline) if args.baseline else default_base
        if args.baseline and not base_path.is_file():
            raise InputError(f"baseline {base_path} does not exist")
        root = Path(args.storage)
        root = root.parent if root.name == gpu else root
        others = [c for c in (args.against or "").split(",") if c]
        baseline = None
        if base_path.is_file():
            baseline, label = read_baseline(base_path, gpu), str(base_path)
        elif len(runs) >= 2:
            baseline, label = runs[-2].results, f"previous {gpu} run {runs[-2].path.name}"
        else:
            print(f"only one {gpu} run under {args.storage} and no baseline file: nothing of "
                  "its class to compare with")
            if not args.against and root.is_dir():  # every class beside this one
                others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != gpu)
        for line in cross_class(runs[-1], others, root, baselines, budgets):
            print(line)
        if baseline is None:
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
