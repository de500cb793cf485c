"""The eviction Pareto study (issues 20 and 23): perplexity of every eviction policy at equal
total cache budgets, one resumable record per configuration, and the table and plot made
from the records (docs/eviction.md shows them and the command).

A budget ``B`` is the tokens held between steps (the query sees ``B + 1``): streaming
``4 + (B-4)``, window ``B``, recompute ``B`` (re-encoded each step), H2O ``B/2`` heavy +
``B/2`` recent (the authors': no sinks), TOVA ``B``, and refresh ``4 + W + R`` with ``R``
in ``B/4`` and ``B/16`` refreshed tokens, refilled every ``2R`` tokens, chosen uniformly
or by score. ``run`` writes ``<out>/<class>-eviction-<book>-<tokens>-<dtype>-<label>.json``
(``<class>``: ``cpu`` or the GPU's, e.g. ``h200``; atomically) and skips every configuration
whose record exists, so an interrupted study loses nothing finished. A TPOT record
(scripts/eviction_tpot.py, Pythia-2.8B shapes) adds TPOT to the table and plot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .ppl import EvalSpec

BUDGETS = (256, 512, 1024, 2048)
BOOKS = ("pg19-10146", "pg19-10321")
POLICIES = ("streaming", "window", "refresh", "tova", "h2o", "recompute")  # cheap first


def configs(budgets: Iterable[int] = BUDGETS,
            policies: Iterable[str] = POLICIES) -> list[EvalSpec]:
    """The study's specs, budget by budget, in ``policies`` order."""
    out = []
    for B in budgets:
        for p in policies:
            if p == "streaming":
                out.append(EvalSpec(mode="streaming", sink=4, window=B - 4))
            elif p == "window":
                out.append(EvalSpec(mode="window", sink=0, window=B))
            elif p == "recompute":
                out.append(EvalSpec(mode="recompute", sink=0, window=B))
            elif p == "h2o":
                out.append(EvalSpec(mode="h2o", options=dict(heavy=B // 2, recent=B - B // 2)))
            elif p == "tova":
                out.append(EvalSpec(mode="tova", options=dict(budget=B)))
            elif p == "refresh":
                for R in (B // 4, B // 16):
                    for select in ("uniform", "score"):
                        out.append(EvalSpec(mode="refresh", options=dict(
                            sink=4, window=B - 4 - R, refresh=R, refresh_every=2 * R,
                            refresh_select=select)))
            else:
                raise ValueError(f"unknown study policy {p!r}")
    return out


def budget_of(spec: EvalSpec) -> int:
    """Tokens held between steps."""
    if spec.mode in ("h2o", "tova", "refresh"):
        return spec.cache_config(1).budget
    return spec.sink + spec.window


def device_prefix(device) -> str:
    """``cpu`` for CPU runs, else the GPU's class (bench.history.gpu_class: ``h200``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    from ..bench.history import gpu_class

    return gpu_class(torch.cuda.get_device_name(dev))


def record_path(out: Path, book: str, tokens: int, dtype: str, spec: EvalSpec,
                prefix: str = "cpu") -> Path:
    return Path(out) / f"{prefix}-eviction-{book}-{tokens}-{dtype}-{spec.label}.json"


def run(lm, specs: list[EvalSpec], *, books: Iterable[str], tokens: int, out: Path,
        dtype: str, log: Callable[[str], None] = print, progress: bool = True,
        model_name: str = "smollm2-135m", deadline: float | None = None,
        ids_for: Callable | None = None, prefix: str | None = None) -> list[Path]:
    """Evaluate every (book, spec) without a record yet; return every record's path. None
    starts after ``deadline`` (time.monotonic); ``ids_for(book)``: (ids, data) instead of
    the book's tokens; ``prefix``: the records' class (default :func:`device_prefix`)."""
    from .record import write_json
    from .run import prepare_tokens, run_one, summary_line

    prefix = prefix or device_prefix(lm.model.device)
    paths = []
    for book in books:
        ids, data = ids_for(book) if ids_for else prepare_tokens(lm, book, tokens)
        for spec in specs:
            path = record_path(out, book, tokens, dtype, spec, prefix)
            paths.append(path)
            done = path.exists()
            if done or (deadline is not None and time.monotonic() > deadline):
                log(f"{book} {spec.label}: " + (f"done before ({path.name})" if done else
                                                "past the time limit, left for a resumed run"))
                continue
            result, record = run_one(lm, ids, data, spec, model_name=model_name,
                                     progress=progress,
                                     extra_config={"study": "eviction",
                                                   "budget": budget_of(spec)})
            write_json(record, path)
            log(f"{book} {dtype} {summary_line(result)} -> {path.name}")
    return paths


def load_records(paths: Iterable[Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]


def policy_name(mode: str, options: dict | None) -> str:
    """The row name of a policy across budgets (records and TPOT rows alike)."""
    o = options or {}
    if mode == "refresh":
        share = (o["sink"] + o["window"] + o["refresh"]) // o["refresh"]
        return f"refresh {o['refresh_select']} R=B/{share}"
    return mode


def _row_name(rec: dict) -> str:
    ev = rec["config"]["eval"]
    return policy_name(ev["mode"], ev.get("options"))


def _col(rec: dict) -> tuple:
    return rec["config"]["budget"], rec["data"]["source"], rec["config"].get("dtype", "")


def tpot_index(tpot: dict | None) -> dict[tuple[str, int], float]:
    """(policy name, budget) -> median TPOT in ms, from an eviction_tpot record."""
    return {(r["policy"], r["budget"]): r["tpot_ms"] for r in (tpot or {}).get("rows", [])
            if r.get("tpot_ms") is not None}


def table(records: list[dict], tpot: dict | None = None) -> str:
    """Markdown: one row per policy, one column per budget, book and dtype: PPL; with a
    TPOT record, a column per budget of TPOT (ms, Pythia-2.8B shapes) after them."""
    cols = sorted({_col(r) for r in records})
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(_row_name(r), {})[_col(r)] = r["result"]["ppl"]
    speed = tpot_index(tpot)
    budgets = sorted({b for _, b in speed})
    head = ("| policy | " + " | ".join(f"{b} {s} {d}".strip() for b, s, d in cols)
            + "".join(f" | TPOT {b}" for b in budgets) + " |")
    lines = [head, "|---" * (len(cols) + len(budgets) + 1) + "|"]
    for name in sorted(set(rows) | {n for n, _ in speed}):
        vals = rows.get(name, {})
        cells = [f"{vals[c]:.2f}" if c in vals else "" for c in cols]
        cells += [f"{speed[name, b]:.3f}" if (name, b) in speed else "" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path, tpot: dict | None = None) -> Path:
    """One panel per book and dtype, one line per policy (one colour each across panels).
    With a TPOT record: PPL against TPOT (ms, Pythia-2.8B shapes) of the points it holds.
    Without: PPL relative to streaming at the same budget (%) against the budget, where the
    policies' differences are visible; the window without sinks (tens of % above) is left
    to the table."""
    from .plot import pyplot, save

    plt = pyplot()
    speed = tpot_index(tpot)
    panels = sorted({_col(r)[1:] for r in records})
    names = sorted({_row_name(r) for r in records})
    colour = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    base = {_col(r): r["result"]["ppl"] for r in records if _row_name(r) == "streaming"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (book, dtype) in zip(axes[0], panels):
        lines: dict[str, list] = {}
        for r in records:
            name, col = _row_name(r), _col(r)
            if col[1:] != (book, dtype):
                continue
            if speed:
                if (name, col[0]) in speed:
                    lines.setdefault(name, []).append((speed[name, col[0]], r["result"]["ppl"]))
            elif name != "window" and col in base:
                lines.setdefault(name, []).append(
                    (col[0], 100 * (r["result"]["ppl"] / base[col] - 1)))
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=name, color=colour[name])
        if speed:
            ax.set_yscale("log")  # the window without sinks sits ~2x above the rest
            ax.yaxis.set_major_formatter("{x:g}")
            ax.yaxis.set_minor_formatter("{x:g}")
            ax.set_xlabel("TPOT, ms (Pythia-2.8B shapes, H200)")
            ax.set_ylabel("perplexity")
        else:
            ax.set_xscale("log", base=2)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("cache budget (tokens held)")
            ax.set_ylabel("PPL vs streaming at the budget, %")
        ax.set_title(f"{book} {dtype}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)
