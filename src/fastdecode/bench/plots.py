"""PNG plots from benchmark history: TPOT-PPL Pareto front, TPOT vs window, TPOT over
commits. Used by ``fastdecode report``."""

from __future__ import annotations

from pathlib import Path

from ..eval.plot import pyplot as _plt
from ..eval.plot import save as _save
from .history import Run


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both TPOT and PPL (lower is better)."""
    return [name for name, t, p in points
            if not any(t2 <= t and p2 <= p and (t2 < t or p2 < p) for _, t2, p2 in points)]


def plot_pareto(run: Run, out: Path, ylabel: str = "PPL / bf16 streaming PPL") -> Path | None:
    pts = [(c, m["tpot_ms"], m["ppl_ratio"]) for c, m in run.results.items()
           if "tpot_ms" in m and "ppl_ratio" in m]
    if not pts:
        return None
    plt = _plt()
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(8, 5))
    # Neighbours' labels alternate sides, so the cluster of graphed configs stays legible.
    for i, (name, t, p) in enumerate(sorted(pts, key=lambda x: (x[2], x[1]))):
        ax.scatter(t, p, color="C3" if name in front else "C0", zorder=3)
        dx, dy = ((5, 4), (5, -9), (-5, 4), (-5, -9))[i % 4]
        ax.annotate(name, (t, p), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                    ha="left" if dx > 0 else "right")
    ax.set_xscale("log")  # eager decoding is ~10x slower than the graphed configurations
    fr = sorted((t, p) for n, t, p in pts if n in front)
    ax.plot([t for t, _ in fr], [p for _, p in fr], color="C3", lw=1, label="Pareto front")
    ax.set_xlabel("TPOT, median (ms/token)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Speed vs accuracy per configuration ({run.gpu}, {run.commit or 'uncommitted'})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def window_series() -> dict[str, int]:
    """Registry configurations that differ only in the window: name -> window."""
    from .. import registry

    return {c.name: c.speed_cache.window for c in registry.CONFIGS.values()
            if c.compile.mode == "graphs" and not c.quant and c.speed_cache.policy == "streaming"
            and c.speed_cache.kv_dtype == "auto" and c.speed_cache.compress_every == 1}


def plot_window(run: Run, out: Path) -> Path | None:
    series = window_series()
    pts = sorted((series[c], m["tpot_ms"]) for c, m in run.results.items()
                 if c in series and "tpot_ms" in m)
    if len(pts) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([w for w, _ in pts], [t for _, t in pts], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window W (sinks + W cached tokens)")
    ax.set_ylabel("TPOT, median (ms/token)")
    ax.set_title(f"Decode time vs window, bf16, graphed ({run.gpu})")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_history(runs: list[Run], out: Path) -> Path | None:
    if not runs:
        return None
    plt = _plt()
    configs = sorted({c for r in runs for c in r.results})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{i}:{r.commit[:7] or '?'}" for i, r in enumerate(runs)]
    for c in configs:
        xs = [i for i, r in enumerate(runs) if "tpot_ms" in r.results.get(c, {})]
        ax.plot(xs, [runs[i].results[c]["tpot_ms"] for i in xs], marker="o", label=c)
    ax.set_xticks(range(len(runs)), labels, rotation=45, fontsize=7)
    ax.set_ylabel("TPOT, median (ms/token)")
    ax.set_yscale("log")  # eager and graphed steps differ ~10x
    ax.set_title(f"TPOT over commits ({runs[-1].gpu})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)
