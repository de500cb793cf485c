"""The figures that hold across GPU classes (#24): efficiency, the TPOT ratio to the same
run's reference step, PPL (docs/gpu.md, "Budgets that hold on any GPU")."""

from __future__ import annotations

from . import budgets as bud
from .roofline import efficiency

# What holds across GPU classes: metric -> lower is better.
CROSS_METRICS = {"efficiency": False, "ref_ratio": True, "ppl": True}


def cross_figures(results: dict[str, dict[str, float]], gpu: str,
                  budgets: dict) -> dict[str, dict[str, float]]:
    """The figures that hold across classes, per configuration: efficiency (runs that did
    not measure it: at ``[meta.copy_gbps]``), the TPOT ratio to the same run's reference, PPL."""
    ref = results.get(bud.reference(budgets), {}).get("tpot_ms")
    fallback = bud.copy_gbps_of(budgets, gpu)
    out = {}
    for config, m in results.items():
        row = {k: m[k] for k in CROSS_METRICS if k in m}
        bw = m.get("copy_gbps") or fallback
        if "efficiency" not in row and bw and "bytes_per_token" in m and "tpot_ms" in m:
            row["efficiency"] = efficiency(m["bytes_per_token"], m["tpot_ms"], bw)
        if "ref_ratio" not in row and ref and "tpot_ms" in m:
            row["ref_ratio"] = m["tpot_ms"] / ref
        out[config] = row
    return out
