"""`fastdecode report`: PNG plots from benchmark history (perf/history/<gpu class>)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plot TPOT/PPL Pareto front, TPOT vs window and TPOT "
                                      "over commits from benchmark history")
    p.add_argument("--history", required=True, help="perf/history/<gpu class> directory")
    p.add_argument("--out", default="docs/img", help="directory for the PNG files")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..bench import plots
    from ..bench.history import load_runs
    from ..errors import InputError

    runs = load_runs(args.history)
    if not runs:
        raise InputError(f"no benchmark runs under {args.history}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = runs[-1].gpu
    made = [plots.plot_pareto(runs[-1], out / f"pareto-{gpu}.png"),
            plots.plot_window(runs[-1], out / f"tpot-vs-window-{gpu}.png"),
            plots.plot_history(runs, out / f"tpot-history-{gpu}.png")]
    for path in made:
        if path:
            print(f"wrote {path}")
    if not any(made):
        raise InputError(f"the runs under {args.history} hold nothing to plot")
    return 0
