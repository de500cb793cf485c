"""The eviction Pareto study (issues 20 and 23): perplexity of every eviction policy at equal
total cache budgets, one resumable record per configuration, and the table and plot made
from the records (docs/eviction.md shows them and the command).

A budget ``B`` is the tokens held between steps (the query sees ``B + 1``): streaming
``4 + (B-4)``, window ``B``, recompute ``B`` (re-encoded each step), H2O ``B/2`` heavy +
``B/2`` recent (the authors': no sinks), TOVA ``B``, and refresh ``4 + W + R`` with ``R``
in ``B/4`` and ``B/16`` refreshed tokens, refilled every ``2R`` tokens, chosen uniformly
or by score. ``run`` writes ``<out>/cpu-eviction-<book>-<tokens>-<dtype>-<label>.json``
(atomically, fastdecode.atomic) and skips every configuration whose record exists, so an
interrupted study resumes with nothing finished lost or recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

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


def record_path(out: Path, book: str, tokens: int, dtype: str, spec: EvalSpec) -> Path:
    return Path(out) / f"cpu-eviction-{book}-{tokens}-{dtype}-{spec.label}.json"


def run(lm, specs: list[EvalSpec], *, books: Iterable[str], tokens: int, out: Path,
        dtype: str, log: Callable[[str], None] = print, progress: bool = True) -> list[Path]:
    """Evaluate every (book, spec) without a record yet; return every record's path."""
    from .record import write_json
    from .run import prepare_tokens, run_one, summary_line

    paths = []
    for book in books:
        ids, data = prepare_tokens(lm, book, tokens)
        for spec in specs:
            path = record_path(out, book, tokens, dtype, spec)
            paths.append(path)
            if path.exists():
                log(f"{book} {spec.label}: done before ({path.name})")
                continue
            result, record = run_one(lm, ids, data, spec, model_name="smollm2-135m",
                                     progress=progress,
                                     extra_config={"study": "eviction",
                                                   "budget": budget_of(spec)})
            write_json(record, path)
            log(f"{book} {summary_line(result)} -> {path.name}")
    return paths


def load_records(paths: Iterable[Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]


def _row_name(rec: dict) -> str:
    ev = rec["config"]["eval"]
    o = ev.get("options") or {}
    if ev["mode"] == "refresh":
        return f"refresh {o['refresh_select']} R={o['refresh']}/{o['refresh_every']}"
    return ev["mode"]


def table(records: list[dict]) -> str:
    """Markdown: one row per policy, one column per budget (and book): PPL."""
    cols = sorted({(r["config"]["budget"], r["data"]["source"]) for r in records})
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(_row_name(r), {})[r["config"]["budget"], r["data"]["source"]] = \
            r["result"]["ppl"]
    head = "| policy | " + " | ".join(f"{b} {s}" for b, s in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for name, vals in rows.items():
        cells = [f"{vals[c]:.2f}" if c in vals else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path) -> Path:
    """Budget (log2) against PPL, one line per policy, one panel per book."""
    from .plot import pyplot, save

    plt = pyplot()
    books = sorted({r["data"]["source"] for r in records})
    fig, axes = plt.subplots(1, len(books), figsize=(6 * len(books), 4.2), squeeze=False)
    for ax, book in zip(axes[0], books):
        lines: dict[str, list] = {}
        for r in records:
            if r["data"]["source"] == book:
                lines.setdefault(_row_name(r), []).append((r["config"]["budget"],
                                                           r["result"]["ppl"]))
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_xlabel("cache budget (tokens held)")
        ax.set_ylabel("perplexity")
        ax.set_title(book)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save(fig, path)
