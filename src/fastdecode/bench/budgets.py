"""Perf budgets (perf/budgets.toml): which apply to a configuration on a GPU class, how a
run's figures meet them, and how a class's budgets are derived or set from measurements.

Three kinds of TPOT budget, so that a card nobody has measured is still gated at its first
run: ``absolute`` (``[<class>.<config>] tpot_ms``, set from runs on that class),
``efficiency`` (``[any.<config>] min_efficiency``: floor at the copy bandwidth measured in
the same run / TPOT, for graphed steps) and ``ratio`` (``[any.<config>] max_ratio``: TPOT /
the reference step's TPOT in the same session, for host-bound steps). Besides them, PPL
ratio and peak memory. A class marked ``derived = true`` has absolute TPOT budgets computed
from the efficiency budgets and an assumed bandwidth: reported with their margin, not
asserted, until a run on that class measures them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from .roofline import floor_ms

ANY = "any"  # the budgets that hold on every GPU class
RESERVED = ("meta", ANY)

# key in budgets.toml -> (kind, metric it bounds, True when the metric must stay below it)
CLASS_KEYS = {"tpot_ms": ("absolute", "tpot_ms", True), "ppl_ratio": ("ppl", "ppl_ratio", True),
              "peak_mem_gb": ("memory", "peak_mem_gb", True)}
ANY_KEYS = {"min_efficiency": ("efficiency", "efficiency", False),
            "max_ratio": ("ratio", "ref_ratio", True), "ppl_ratio": ("ppl", "ppl_ratio", True)}


def load_budgets(path: str | Path) -> dict:
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"budgets file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None


def reference(budgets: dict) -> str:
    """The configuration the ratio budgets divide by (measured in the same session)."""
    return budgets.get("meta", {}).get("reference", "bf16-stream-graphs")


def copy_gbps_of(budgets: dict, gpu: str) -> float | None:
    """The copy bandwidth recorded for a class (``[meta.copy_gbps]``), for runs that did not
    measure their own (suite runs before the efficiency budgets)."""
    v = budgets.get("meta", {}).get("copy_gbps", {}).get(gpu)
    return float(v) if v else None


def margin_for(budgets: dict, gpu: str, config: str) -> float:
    """The noise margin ``compare`` allows a configuration on a class."""
    default = budgets.get("meta", {}).get("noise_margin", 0.03)
    for table in (gpu, ANY):
        if "noise_margin" in budgets.get(table, {}).get(config, {}):
            return budgets[table][config]["noise_margin"]
    return default


@dataclass
class Check:
    """One budget applied to one measured figure."""

    kind: str  # absolute | efficiency | ratio | ppl | memory
    metric: str
    limit: float
    upper: bool  # the figure must stay at or below the limit (else at or above)
    source: str  # the table it came from: a class, or "any"
    gate: bool = True  # False: reported, not asserted (a derived budget)
    value: float | None = None

    @property
    def margin(self) -> float | None:
        """Headroom as a share of the limit; negative when the budget is missed."""
        if self.value is None:
            return None
        return (self.limit - self.value if self.upper else self.value - self.limit) / self.limit

    @property
    def ok(self) -> bool | None:
        return None if self.value is None else self.margin >= 0

    def line(self) -> str:
        rel = "<=" if self.upper else ">="
        src = self.source + ("" if self.gate else ", derived: not asserted")
        if self.value is None:
            return f"{self.kind:10s} {self.metric} {rel} {self.limit:.4g} [{src}]: not measured"
        state = "ok" if self.ok else ("MISSED" if self.gate else "over")
        return (f"{self.kind:10s} {self.metric} {self.value:.4g} {rel} {self.limit:.4g} "
                f"[{src}]: {state}, margin {self.margin:+.1%}")

    def to_dict(self) -> dict:
        return {**asdict(self), "margin": self.margin, "ok": self.ok}


def applicable(budgets: dict, gpu: str, config: str) -> list[Check]:
    """The budgets for ``config`` on ``gpu``: the class's own entry (its PPL ratio in place of
    the any-class one), then the any-class efficiency / ratio / PPL budgets."""
    if gpu in RESERVED:
        raise InputError(f"{gpu!r} is a reserved table name in budgets.toml, not a GPU class")
    own = budgets.get(gpu, {}).get(config, {})
    derived = bool(budgets.get(gpu, {}).get("derived") or own.get("derived"))
    out = [Check(kind, metric, float(own[key]), upper, gpu,
                 gate=not (derived and kind == "absolute"))
           for key, (kind, metric, upper) in CLASS_KEYS.items() if key in own]
    for key, (kind, metric, upper) in ANY_KEYS.items():
        v = budgets.get(ANY, {}).get(config, {}).get(key)
        if v is not None and not (kind == "ppl" and "ppl_ratio" in own):
            out.append(Check(kind, metric, float(v), upper, ANY))
    return out


def evaluate(budgets: dict, gpu: str, config: str, metrics: dict) -> list[Check]:
    """The applicable budgets, each with the run's figure (``metrics``: tpot_ms, efficiency,
    ref_ratio, ppl_ratio, peak_mem_gb; a figure not measured stays None)."""
    checks = applicable(budgets, gpu, config)
    for c in checks:
        v = metrics.get(c.metric)
        c.value = None if v is None else float(v)
    return checks


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.gate and c.ok is False]


def derive_class(budgets: dict, bytes_by_config: dict[str, float], copy_gbps: float,
                 like: str) -> dict[str, dict]:
    """Budgets for a class no run has measured: TPOT = floor at ``copy_gbps`` / the
    configuration's minimum efficiency (graphed steps; host-bound ones keep their ratio
    budget only), PPL ratio and peak memory those of class ``like`` (neither depends on the
    bandwidth). ``bytes_by_config``: bytes per token, which do not depend on the card."""
    out = {}
    for config, entry in sorted(budgets.get(ANY, {}).items()):
        row = {}
        if "min_efficiency" in entry and config in bytes_by_config:
            row["tpot_ms"] = round(floor_ms(bytes_by_config[config], copy_gbps)
                                   / entry["min_efficiency"], 3)
        src = budgets.get(like, {}).get(config, {})
        row.update({k: src[k] for k in ("ppl_ratio", "peak_mem_gb", "noise_margin") if k in src})
        if row:
            out[config] = row
    return out


def from_baseline(baseline: dict[str, dict[str, float]], budgets: dict) -> dict[str, dict]:
    """Budgets for a class from the mean of its runs (a ``--record-baseline`` file's
    configs), by the rules budgets.toml states: TPOT x ``meta.tpot_factor`` (x
    ``tpot_factor_tuned`` where the configuration's noise margin is above the default:
    launches that vary by process), none for host-bound steps (their ratio budget gates
    them), PPL ratio + ``ppl_slack``, peak memory x ``mem_factor``."""
    meta = budgets.get("meta", {})
    default = meta.get("noise_margin", 0.03)
    out = {}
    for config, m in sorted(baseline.items()):
        anyb = budgets.get(ANY, {}).get(config, {})
        row = {}
        if "tpot_ms" in m and "max_ratio" not in anyb:
            tuned = anyb.get("noise_margin", default) > default
            f = meta.get("tpot_factor_tuned" if tuned else "tpot_factor", 1.05)
            row["tpot_ms"] = round(m["tpot_ms"] * f, 3)
        if "ppl_ratio" in m:
            row["ppl_ratio"] = round(m["ppl_ratio"] + meta.get("ppl_slack", 0.005), 4)
        if "peak_mem_gb" in m:
            row["peak_mem_gb"] = round(m["peak_mem_gb"] * meta.get("mem_factor", 1.10), 2)
        if row:
            out[config] = row
    return out


def toml_block(gpu: str, rows: dict[str, dict], note: str) -> str:
    """``[<gpu>.<config>]`` tables for budgets.toml, each line saying where it came from."""
    lines = []
    for config, row in rows.items():
        lines.append(f"[{gpu}.{config}]  # {note}")
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in row.items()]
        lines.append("")
    return "\n".join(lines)
