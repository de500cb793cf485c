"""`compare --bench` (#22 item 2): `fastdecode bench` records' TPOT against the perf suite
run's for the registry configuration each matches, within ``[meta].bench_agreement``."""

from __future__ import annotations

from .history import Run, read_json


def _stored_format(recipe: str | None):
    """What TPOT depends on in a quantization recipe: the stored format, not the method."""
    from ..quant import QuantConfig

    if not recipe:
        return None
    q = QuantConfig.parse(recipe)
    return q.kind, q.filter, q.group_size if q.kind == "int4" else None, q.head


def bench_agreement(latest: Run, records: dict[str, dict]) -> list[tuple]:
    """Rows (record name, matching registry config or None, suite TPOT, bench TPOT) of
    `fastdecode bench` records beside the suite run (same model, cache, compile, format)."""
    from .. import registry

    rows = []
    for name, rec in records.items():
        c = rec.get("config", {})
        match = next((n for n, cfg in registry.CONFIGS.items()
                      if c.get("model") == "pythia-2.8b" and c.get("compile") == cfg.compile.mode
                      and c.get("cache") == cfg.speed_cache.to_dict()
                      and _stored_format(c.get("quant")) == _stored_format(cfg.quant)), None)
        suite = latest.results.get(match, {}).get("tpot_ms") if match else None
        rows.append((name, match, suite, rec.get("result", {}).get("tpot_ms", {}).get("median")))
    return rows


def agreement(latest: Run, paths: list[str], budgets: dict) -> int:
    limit = budgets.get("meta", {}).get("bench_agreement", 0.03)
    records = {p: read_json(p, "bench record") for p in paths}
    bad = 0
    print(f"bench records vs suite run {latest.path.name} (TPOT, ms; limit {limit:.0%})")
    for name, config, suite, bench in bench_agreement(latest, records):
        if config is None or suite is None or bench is None:
            bad += 1
            why = "no registry configuration matches" if config is None else \
                f"{config} is not in the suite run" if suite is None else "no TPOT in it"
            print(f"UNMATCHED   {name}: {why}")
            continue
        diff = bench / suite - 1
        bad += abs(diff) > limit
        print(f"{'AGREE' if abs(diff) <= limit else 'DISAGREE':11s} {config:24s} suite "
              f"{suite:.3f} bench {bench:.3f} ({diff:+.1%}) {name}")
    return 1 if bad else 0
