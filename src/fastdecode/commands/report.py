"""`fastdecode report`: PNG plots from benchmark history (perf/history/<gpu class>)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plot TPOT/PPL Pareto front, TPOT vs window and TPOT "
                                      "over commits from benchmark history")
    p.add_argument("--history", required=True, help="perf/history/<gpu class> directory")
    p.add_argument("--gpu", default=None, metavar="CLASS",
                   help="GPU class plotted (default: the newest run's); runs of other classes "
                        "are skipped and listed")
    p.add_argument("--out", default=None,
                   help="directory for the PNG files (default: perf/plots/<gpu class> beside "
                        "a perf/history/<gpu class> directory; needed for any other history)")
    p.set_defaults(run=run)


def default_out(history: Path, gpu: str) -> Path | None:
    """``<root>/perf/plots/<gpu>`` for a history at ``<root>/perf/history/<...>`` (the
    layout the repository uses); None elsewhere. Never relative to the working directory."""
    h = history.resolve()
    for p in (h, *h.parents):
        if p.name == "history" and p.parent.name == "perf":
            return p.parent / "plots" / gpu
    return None


def run(args) -> int:
    from ..atomic import check_output_dir, check_output_file
    from ..bench import plots
    from ..bench.history import load_history
    from ..errors import InputError

    hist = load_history(args.history, args.gpu)
    for line in hist.report_skipped():
        print(line)
    runs = hist.runs
    if not runs:
        raise InputError(f"no usable benchmark runs of GPU class {hist.gpu} under "
                         f"{args.history}")
    gpu = hist.gpu
    out = Path(args.out) if args.out else default_out(Path(args.history), gpu)
    if out is None:
        raise InputError(f"--out is needed: {args.history} is not under perf/history/, so "
                         "there is no default place for the plots")
    check_output_dir(out, force=True, what="--out directory")  # its PNGs are replaced
    names = [out / f"{kind}-{gpu}.png" for kind in ("pareto", "tpot-vs-window", "tpot-history")]
    for path in names:
        check_output_file(path, "plot")
    made = [plots.plot_pareto(runs[-1], names[0]), plots.plot_window(runs[-1], names[1]),
            plots.plot_history(runs, names[2])]
    for path in made:
        if path:
            print(f"wrote {path}")
    if not any(made):
        raise InputError(f"the runs under {args.history} hold nothing to plot")
    return 0
