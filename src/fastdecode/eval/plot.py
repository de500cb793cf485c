"""Plots of per-segment perplexity against the position in the text (matplotlib, optional)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import FastdecodeError
from .ppl import segment_ppl


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastdecodeError("plotting needs matplotlib (pip install matplotlib)") from None
    return plt


_LAZY = ("tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive")
_SINKS = ("tab:blue", "tab:orange", "tab:olive", "tab:gray")


def _style(label: str) -> dict:
    if label == "dense":
        return {"color": "black", "lw": 2.0}
    if label.startswith("recompute"):
        return {"color": "tab:green", "lw": 2.0, "ls": "-."}
    if label.startswith("window"):
        return {"color": "tab:red", "lw": 1.8, "ls": ":"}
    m = re.search(r"-R(\d+)", label)
    if m:
        return {"lw": 1.2, "ls": "--", "color": _LAZY[int(m.group(1)).bit_length() % len(_LAZY)]}
    m = re.match(r"streaming-(\d+)\+", label)
    if m:
        return {"lw": 1.4, "color": _SINKS[int(m.group(1)).bit_length() % len(_SINKS)]}
    return {"lw": 1.4}


def plot_segments(curves: dict[str, np.ndarray], path: str | Path, *, segment: int = 1024,
                  trained_context: int | None = None, title: str = "",
                  panels: dict[str, list[str]] | None = None) -> Path:
    """One line per configuration (``curves``: label -> per-token NLL) of the PPL of each
    ``segment``-token segment, log y; ``panels``: title -> labels (default: one, all)."""
    plt = pyplot()
    panels = panels or {"": list(curves)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), sharey=True,
                             squeeze=False)
    for ax, (ptitle, labels) in zip(axes[0], panels.items()):
        for label in labels:
            nll = curves.get(label)
            if nll is None or len(nll) == 0:
                continue
            seg = segment_ppl(np.asarray(nll), segment)
            x = np.minimum(np.arange(1, len(seg) + 1) * segment, len(nll))
            ax.plot(x, seg, marker="o", ms=2.5, label=label, **_style(label))
        if trained_context:
            ax.axvline(trained_context, color="gray", lw=0.8, ls="--")
            ax.text(trained_context, 0.98, " trained context", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("tokens scored")
        ax.set_title(ptitle, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel(f"PPL per {segment}-token segment (log)")
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    """Write the figure atomically (a reader never sees half a PNG) and close it."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, "plot") as tmp:
        fig.savefig(tmp, dpi=130, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path
