"""Benchmark history: the JSON files pytest-benchmark writes under perf/history/<gpu class>/.

Each perf test is one benchmark named ``test_decode[<config>]`` whose ``extra_info`` holds
the configuration name and the figures besides time (PPL, peak memory, bandwidth, peer
ratios); the runs are keyed by GPU class so an A800 is only ever compared with an A800.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

METRICS = ("tpot_ms", "ppl", "peak_mem_gb")  # the figures budgets and compare look at


def gpu_class(name: str) -> str:
    """'NVIDIA A800-SXM4-80GB' -> 'a800', 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([AHBL]\d{2,3}[A-Z]?|RTX ?\d{4}|V100|T4)\b", name.upper())
    if m:
        return m.group(1).replace(" ", "").lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@dataclass
class Run:
    path: Path
    datetime: str
    commit: str
    gpu: str
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # config -> metrics


def read_run(path: Path) -> Run:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read benchmark run {path}: {e}") from None
    machine = data.get("machine_info", {})
    run = Run(path=Path(path), datetime=data.get("datetime", ""),
              commit=(data.get("commit_info") or {}).get("id", "")[:12],
              gpu=machine.get("gpu_class") or gpu_class(machine.get("gpu", "unknown")))
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        name = extra.get("config") or (bench.get("params") or {}).get("config") or bench["name"]
        metrics = {k: float(v) for k, v in extra.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # The timed quantity is one decode step: pytest-benchmark's stats are in seconds.
        metrics.setdefault("tpot_ms", bench["stats"]["median"] * 1e3)
        run.results[name] = metrics
    return run


def load_runs(storage: str | Path) -> list[Run]:
    """All runs under ``storage`` (searched recursively), oldest first."""
    storage = Path(storage)
    if not storage.exists():
        raise InputError(f"no benchmark history at {storage}")
    runs = [read_run(p) for p in sorted(storage.rglob("*.json"))]
    return sorted(runs, key=lambda r: r.datetime)
