"""NLL diagnosis ("Phase A"): per-token NLL, attention span and eviction events, and how
much the NLL spikes around the events; the events and metrics (baseline, excess, peak,
area, width, first_event, event_aligned) are defined in docs/ppl.md, Diagnosis."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import ConfigError
from .ppl import PPLResult, dropped_tokens

COLUMNS = ("step", "input_id", "target_id", "nll", "kv_len", "dropped")


def eviction_events(kv_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps with an eviction event, tokens dropped at each)."""
    dropped = dropped_tokens(np.asarray(kv_len))
    steps = np.flatnonzero(dropped > 0)
    return steps, dropped[steps]


def _curve_metrics(excess: np.ndarray, smooth: int) -> dict:
    """peak / area / width of one excess curve (docs/ppl.md)."""
    h = excess.size
    if h == 0:
        return {"peak": None, "peak_offset": None, "area": 0.0, "width": 0, "persistent": False}
    k = max(1, min(smooth, h))
    csum = np.concatenate(([0.0], np.cumsum(excess)))
    # smoothed(o) = mean(excess[o : o + k]), truncated at the horizon's end
    ends = np.minimum(np.arange(h) + k, h)
    smoothed = (csum[ends] - csum[:h]) / (ends - np.arange(h))
    o_peak = int(np.argmax(smoothed))
    peak = float(smoothed[o_peak])
    lo = hi = o_peak  # the contiguous run around the peak at >= half of it
    if peak > 0:
        while lo > 0 and smoothed[lo - 1] >= peak / 2:
            lo -= 1
        while hi + 1 < h and smoothed[hi + 1] >= peak / 2:
            hi += 1
    width = hi - lo + 1 if peak > 0 else 0
    return {"peak": peak, "peak_offset": o_peak, "area": float(excess.sum()),
            "width": width, "persistent": bool(peak > 0 and hi == h - 1)}


def spike_at(nll: np.ndarray, e: int, *, before: int, after: int, smooth: int) -> dict | None:
    """Metrics of a single event at step ``e`` (None without a baseline before it)."""
    lo = max(0, e - before)
    if e - lo < 1:
        return None
    base = float(np.mean(nll[lo:e]))
    excess = nll[e:e + after] - base
    return {"step": int(e), "baseline": base, "baseline_steps": int(e - lo),
            "horizon": int(excess.size), **_curve_metrics(excess, smooth)}


def event_aligned(nll: np.ndarray, events: np.ndarray, *, before: int, after: int) -> dict | None:
    """Metrics of the NLL curve averaged over every event (periodic events only); the
    baseline is the last quarter-period before the event, furthest from the previous one."""
    if events.size < 2:
        return None
    period = int(np.min(np.diff(events)))
    if period < 2:
        return None
    b, a = min(before, max(1, period // 4)), min(after, period)
    usable = [e for e in events if e - b >= 0 and e + a <= nll.size]
    if not usable:
        return None
    curves = np.stack([nll[e - b:e + a] for e in usable])
    mean = curves.mean(0)
    base = float(mean[:b].mean())
    excess = mean[b:] - base
    return {"events_used": len(usable), "period": period, "baseline_steps": b, "after": a,
            "baseline": base, **_curve_metrics(excess, 1),
            "curve": [round(float(v), 5) for v in excess]}


def diagnose(result: PPLResult | None = None, *, nll=None, kv_len=None, reference=None,
             reference_label: str | None = None, before: int = 256, after: int = 512,
             smooth: int = 32) -> dict:
    """The diagnosis summary of one evaluation; with a ``reference`` run on the same tokens
    (e.g. dense) the metrics are taken on ``nll - reference``, removing token difficulty."""
    for name, v in (("before", before), ("after", after), ("smooth", smooth)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if result is not None:
        nll, kv_len = result.nll, result.kv_len
    if nll is None or kv_len is None:
        raise ConfigError("diagnose needs a result, or nll and kv_len")
    nll = np.asarray(nll, dtype=np.float64)
    kv_len = np.asarray(kv_len)
    signal = nll
    if reference is not None:
        if hasattr(reference, "nll"):
            reference_label = reference_label or reference.spec.label
            reference = reference.nll
        reference_label = reference_label or "reference"
        reference = np.asarray(reference, dtype=np.float64)
        if reference.shape != nll.shape:
            raise ConfigError(f"reference has {reference.size} tokens, the run {nll.size}")
        signal = nll - reference
    steps, dropped = eviction_events(kv_len)
    summary = {
        "params": {"before": before, "after": after, "smooth": smooth},
        "signal": "nll - reference" if reference is not None else "nll",
        "reference": reference_label if reference is not None else None,
        "kv_len": {"max": int(kv_len.max()),
                   "min_after_first_event": int(kv_len[steps[0]:].min()) if steps.size
                   else None},
        "events": {"count": int(steps.size), "tokens_dropped": int(dropped.sum()),
                   "first_step": int(steps[0]) if steps.size else None,
                   "strict": bool(steps.size > 1 and np.all(np.diff(steps) == 1))},
        "first_event": None,
        "event_aligned": None,
    }
    if reference is not None:
        summary["mean_excess_nll"] = float(signal.mean())
        if steps.size:
            summary["mean_excess_nll_after_first_event"] = float(signal[steps[0]:].mean())
    if steps.size:
        summary["first_event"] = spike_at(signal, int(steps[0]), before=before, after=after,
                                          smooth=smooth)
        summary["event_aligned"] = event_aligned(signal, steps, before=before, after=after)
    return summary


def write_per_token(result: PPLResult, ids, path: str | Path) -> Path:
    """Write step, input id, target id, NLL, attention span and tokens dropped per step
    (``.csv``, or ``.npz`` with the same names), atomically (fastdecode.atomic)."""
    path = Path(path)
    ids = np.asarray(ids, dtype=np.int64)
    n = result.n
    cols = {"step": np.arange(n), "input_id": ids[:n], "target_id": ids[1:n + 1],
            "nll": result.nll, "kv_len": result.kv_len, "dropped": result.dropped}
    if path.suffix == ".npz":
        with atomic.atomic_open(path, "wb", "per-token file") as f:
            np.savez_compressed(f, **cols)
        return path
    with atomic.atomic_open(path, "w", "per-token file", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in range(n):
            w.writerow((i, int(cols["input_id"][i]), int(cols["target_id"][i]),
                        f"{cols['nll'][i]:.6f}", int(cols["kv_len"][i]),
                        int(cols["dropped"][i])))
    return path


def read_per_token(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    data = np.genfromtxt(path, delimiter=",", names=True)
    return {k: np.asarray(data[k]) for k in data.dtype.names}
