"""Benchmark history: pytest-benchmark's JSON files under perf/history/<gpu class>/, figures in
``extra_info``, compared within a class only (docs/gpu.md, "The regression suite")."""

from __future__ import annotations

import json
import math
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


def _fail(path, why: str):
    raise InputError(f"benchmark run {path} is not usable: {why}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_json(path, what: str):
    """The JSON held at ``path``, else an InputError naming ``what`` and the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None


def read_run(path: Path) -> Run:
    """One pytest-benchmark file, validated: InputError naming the file and the problem."""
    data = read_json(path, "benchmark run")
    if not isinstance(data, dict):
        _fail(path, f"the JSON is a {type(data).__name__}, not an object")
    machine = data.get("machine_info") or {}
    commit = data.get("commit_info") or {}
    benches = data.get("benchmarks")
    if not isinstance(machine, dict) or not isinstance(commit, dict):
        _fail(path, "machine_info / commit_info are not objects")
    if not isinstance(benches, list):
        _fail(path, "no 'benchmarks' list")
    gpu = machine.get("gpu_class") or gpu_class(str(machine.get("gpu") or "unknown"))
    run = Run(path=Path(path), datetime=str(data.get("datetime") or ""),
              commit=str(commit.get("id") or "")[:12], gpu=str(gpu))
    for i, bench in enumerate(benches):
        if not isinstance(bench, dict):
            _fail(path, f"benchmark #{i} is not an object")
        extra = bench.get("extra_info") or {}
        params = bench.get("params") or {}
        if not isinstance(extra, dict) or not isinstance(params, dict):
            _fail(path, f"benchmark #{i}: extra_info / params are not objects")
        name = extra.get("config") or params.get("config") or bench.get("name")
        if not isinstance(name, str) or not name:
            _fail(path, f"benchmark #{i} has no name")
        metrics = {k: float(v) for k, v in extra.items() if _number(v)}
        # The timed quantity is one decode step: pytest-benchmark's stats are in seconds.
        if "tpot_ms" not in metrics:
            stats = bench.get("stats")
            median = stats.get("median") if isinstance(stats, dict) else None
            if not _number(median):
                _fail(path, f"benchmark {name!r} has no stats.median and no tpot_ms")
            metrics["tpot_ms"] = median * 1e3
        run.results[name] = metrics
    if not run.results:
        _fail(path, "it holds no benchmarks")
    return run


@dataclass
class History:
    """The runs of one GPU class, oldest first, and the (file, why) left out."""

    storage: Path
    gpu: str
    runs: list[Run]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def report_skipped(self) -> list[str]:
        """One line per file left out (for the user: nothing is dropped silently)."""
        return [f"skipped {p}: {why}" for p, why in self.skipped]


def load_history(storage: str | Path, gpu: str | None = None) -> History:
    """The runs under ``storage`` (recursively) of class ``gpu`` (default: the newest
    run's), oldest first; invalid files and other classes are skipped and reported."""
    storage = Path(storage)
    if not storage.exists():
        raise InputError(f"no benchmark history at {storage}")
    if not storage.is_dir():
        raise InputError(f"benchmark history {storage} is not a directory")
    valid, skipped = [], []
    for p in sorted(storage.rglob("*.json")):
        try:
            valid.append(read_run(p))
        except InputError as e:
            skipped.append((p, str(e)))
    valid.sort(key=lambda r: r.datetime)
    if gpu is None:
        gpu = valid[-1].gpu if valid else "unknown"
    runs = [r for r in valid if r.gpu == gpu]
    skipped += [(r.path, f"GPU class {r.gpu}, not {gpu}") for r in valid if r.gpu != gpu]
    return History(storage, gpu, runs, skipped)
