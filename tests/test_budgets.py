"""Perf budgets on the CPU: the floor arithmetic against a hand count, the efficiency of a
recorded run, which budgets apply to a class (with entries, missing, derived), ratio
budgets, baselines -> budgets, compare across classes, and one timing for bench and suite."""

import json
import statistics
from pathlib import Path

import pytest
import tomllib
import torch

from fastdecode.bench import budgets as bud
from fastdecode.bench import compare as cmp
from fastdecode.bench import cross_figures, roofline, tpot
from fastdecode.bench.history import read_run
from fastdecode.cache import CacheConfig
from fastdecode.engine import Decoder
from fastdecode.models import load_model
from fastdecode.quant import QuantConfig, quantize_model

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = bud.load_budgets(ROOT / "perf" / "budgets.toml")
H100_RUN = sorted((ROOT / "perf" / "history" / "h100").glob("0011_*.json"))[0]


def tiny(quant=None, kv="auto"):
    lm = load_model("tiny-neox", dtype=torch.float32, device="cpu")
    if quant:
        quantize_model(lm.model, QuantConfig.parse(quant))
    dec = Decoder.build(lm.model, CacheConfig(policy="streaming", sink=2, window=6, kv_dtype=kv))
    return lm, dec


@pytest.mark.parametrize("quant,kv", [(None, "auto"), ("int8", "int8"), ("int4-g32-rtn", "auto")])
def test_bytes_per_token_hand_count(quant, kv):
    """tiny-neox: hidden 32, 2 layers, 4 heads of 8, MLP 64, vocab 97, float32; 2 sinks + 6
    window = 9 slots a layer (the new token's included)."""
    lm, dec = tiny(quant, kv)
    h, f, L, V, f4 = 32, 64, 2, 97, 4
    linears = [(3 * h, h), (h, h), (f, h), (h, f)]  # (out, in): qkv, out, up, down

    def linear(o, i):
        if quant is None:
            return o * i * f4 + o * f4  # weight + bias
        if quant == "int8":
            return o * i + o * f4 + o * f4  # int8 codes + a scale per row + bias
        groups = i // 32  # int4 g32: two codes a byte, a scale and a zero per group
        return o * i // 2 + 2 * o * groups * f4 + o * f4

    layer = 4 * h * f4 + sum(linear(o, i) for o, i in linears)  # two LayerNorms (w, b)
    weights = L * layer + 2 * h * f4 + h * f4 + V * h * f4  # final norm, embed row, head
    slots, heads, d = 9, 4, 8
    kv_bytes = L * 2 * heads * slots * d * (1 if kv == "int8" else f4)
    if kv == "int8":
        kv_bytes += L * 2 * heads * slots * 4  # a float32 scale per layer, head, slot; K and V
    assert roofline.bytes_per_token(lm.model, dec.cache) == {
        "weights": weights, "kv": kv_bytes, "total": weights + kv_bytes}


def test_floor_and_efficiency():
    # The H200 bf16 row of issue #22: 5.97 GB at 4,246 GB/s = 1.405 ms; at 1.866 ms, 75%.
    assert roofline.floor_ms(5.9656e9, 4246) == pytest.approx(1.405, abs=1e-3)
    assert roofline.efficiency(5.9656e9, 1.866, 4246) == pytest.approx(0.753, abs=1e-3)
    assert roofline.device_bandwidth("cpu")["copy_gbps"] is None


def write_run(folder: Path, i: int, figures: dict, gpu="NVIDIA H200"):
    """A run as the perf suite writes it (pytest-benchmark JSON, figures in extra_info)."""
    folder.mkdir(parents=True, exist_ok=True)
    benches = [{"name": f"test_decode[{c}]", "params": {"config": c},
                "stats": {"median": m["tpot_ms"] / 1e3}, "extra_info": {"config": c, **m}}
               for c, m in figures.items()]
    path = folder / f"{i:04d}_run.json"
    path.write_text(json.dumps({"machine_info": {"gpu": gpu}, "commit_info": {"id": f"{i:07d}"},
                                "datetime": f"2026-12-01T08:{i:02d}:00", "benchmarks": benches}))
    return path


def test_efficiency_from_recorded_runs(tmp_path):
    # A run that measured its copy bandwidth: efficiency = bytes / bandwidth / TPOT.
    run = read_run(write_run(tmp_path, 1, {
        "bf16-stream-graphs": {"tpot_ms": 2.0, "bytes_per_token": 6e9, "copy_gbps": 4000.0},
        "bf16-stream-eager": {"tpot_ms": 30.0, "bytes_per_token": 6e9, "copy_gbps": 4000.0}}))
    fig = cross_figures.cross_figures(run.results, "h200", BUDGETS)
    assert fig["bf16-stream-graphs"]["efficiency"] == pytest.approx(6e9 / 4000e9 / 2e-3)
    assert fig["bf16-stream-eager"]["ref_ratio"] == pytest.approx(15.0)
    # An H100 run from before the efficiency budgets: [meta.copy_gbps] h100 = 3004.
    old = read_run(H100_RUN)
    fig = cross_figures.cross_figures(old.results, "h100", BUDGETS)
    m = old.results["bf16-stream-graphs"]
    assert fig["bf16-stream-graphs"]["efficiency"] == pytest.approx(
        m["bytes_per_token"] / 3004e9 / (m["tpot_ms"] / 1e3))
    assert 0.84 < fig["bf16-stream-graphs"]["efficiency"] < 0.86  # budgets.toml's 0.848


def test_recorded_h100_run_meets_the_any_class_budgets():
    """The any-class budgets were set from this run (and the H200's) with a margin: every
    configuration of H100 run 0011 meets them, with headroom, on an unnamed class too."""
    run = read_run(H100_RUN)
    fig = cross_figures.cross_figures(run.results, "h100", BUDGETS)
    for config, m in run.results.items():
        checks = bud.evaluate(BUDGETS, "new-card", config, {**m, **fig[config]})
        kinds = {c.kind for c in checks}
        assert kinds == ({"ratio", "ppl"} if "eager" in config or "compiled" in config
                         else {"efficiency", "ppl"}), config
        assert all(c.ok and c.margin > 0.05 for c in checks if c.kind != "ppl"), config


def test_class_with_entries_applies_its_own_and_the_any_class_budgets():
    checks = bud.evaluate(BUDGETS, "h100", "bf16-stream-graphs",
                          {"tpot_ms": 2.40, "efficiency": 0.80, "ppl_ratio": 1.001,
                           "peak_mem_gb": 7.2, "ref_ratio": 1.0})
    by = {c.kind: c for c in checks}
    assert sorted(by) == ["absolute", "efficiency", "memory", "ppl"]
    assert by["ppl"].source == "h100" and by["efficiency"].source == "any"
    assert by["absolute"].margin == pytest.approx((2.536 - 2.40) / 2.536)
    assert by["efficiency"].margin == pytest.approx((0.80 - 0.65) / 0.65)
    assert not bud.failures(checks)
    slow = bud.evaluate(BUDGETS, "h100", "bf16-stream-graphs", {"tpot_ms": 2.6,
                                                                "efficiency": 0.60})
    assert {c.kind for c in bud.failures(slow)} == {"absolute", "efficiency"}
    assert "MISSED" in bud.failures(slow)[0].line()
    assert [c.line().endswith("not measured") for c in slow if c.kind == "ppl"] == [True]


def test_missing_class_is_gated_by_efficiency_and_ratio():
    graphed = bud.evaluate(BUDGETS, "b200", "int8-all-graphs", {"efficiency": 0.43})
    assert [(c.kind, c.source, c.ok) for c in graphed] == [("efficiency", "any", False),
                                                          ("ppl", "any", None)]
    # Host-bound: a ratio to the reference step of the same session, never a time.
    eager = bud.evaluate(BUDGETS, "b200", "bf16-stream-eager", {"tpot_ms": 90.0,
                                                                "ref_ratio": 30.0})
    assert [(c.kind, c.ok) for c in eager if c.kind != "ppl"] == [("ratio", True)]
    assert bud.failures(bud.evaluate(BUDGETS, "b200", "bf16-stream-eager",
                                     {"ref_ratio": 40.0}))[0].kind == "ratio"
    assert bud.reference(BUDGETS) == "bf16-stream-graphs"
    with pytest.raises(Exception, match="reserved"):
        bud.applicable(BUDGETS, "any", "int8-all-graphs")


def test_derived_class_reports_its_times_and_gates_by_efficiency():
    checks = bud.evaluate(BUDGETS, "a800", "bf16-stream-graphs",
                          {"tpot_ms": 6.0, "efficiency": 0.70})
    absolute = [c for c in checks if c.kind == "absolute"][0]
    assert not absolute.gate and absolute.ok is False and "derived" in absolute.line()
    assert not bud.failures(checks)  # over the derived time, within the efficiency budget
    assert bud.failures(bud.evaluate(BUDGETS, "a800", "bf16-stream-graphs",
                                     {"tpot_ms": 4.0, "efficiency": 0.5}))[0].kind == "efficiency"


def test_a800_budgets_are_the_derivation_from_the_efficiency_budgets():
    """budgets.toml's [a800] tables are derive_class at the assumed 1,805 GB/s with the
    bytes of H100 run 0011 and the H100's PPL and memory (printed by compare --derive)."""
    bytes_ = {c: m["bytes_per_token"] for c, m in read_run(H100_RUN).results.items()}
    rows = bud.derive_class(BUDGETS, bytes_, BUDGETS["meta"]["copy_gbps"]["a800"], "h100")
    a800 = {k: v for k, v in BUDGETS["a800"].items() if k != "derived"}
    assert BUDGETS["a800"]["derived"] is True and a800 == rows
    # bf16 streaming: 5.9656 GB / 1,805 GB/s / 0.65 = 5.085 ms; no time for host-bound steps.
    assert rows["bf16-stream-graphs"]["tpot_ms"] == pytest.approx(5.085, abs=1e-3)
    assert "tpot_ms" not in rows["bf16-stream-eager"]


def test_record_baseline_then_suggest_budgets(tmp_path, capsys):
    hist = tmp_path / "hist" / "h200"
    for i, t in enumerate((1.80, 1.83, 1.86), start=1):
        write_run(hist, i, {"bf16-stream-graphs": {"tpot_ms": t, "ppl_ratio": 1.0,
                                                   "peak_mem_gb": 7.0},
                            "int4-mlp-g128-graphs": {"tpot_ms": t - 0.4, "peak_mem_gb": 5.5},
                            "bf16-stream-eager": {"tpot_ms": 40.0 + i}})
    base = tmp_path / "baselines"
    args = ["--storage", str(hist), "--baselines", str(base)]
    assert cmp.main([*args, "--suggest-budgets"]) == 2
    assert "--record-baseline 3" in capsys.readouterr().err
    assert cmp.main([*args, "--record-baseline", "3"]) == 0
    capsys.readouterr()
    assert cmp.main([*args, "--suggest-budgets"]) == 0
    rows = tomllib.loads(capsys.readouterr().out)["h200"]
    # graphed x1.05; int4-mlp (noise margin above the default: launches vary) x1.10; PPL
    # + 0.005; memory x1.10; the host-bound step none (its ratio budget gates it).
    assert rows["bf16-stream-graphs"] == {"tpot_ms": round(1.83 * 1.05, 3), "ppl_ratio": 1.005,
                                          "peak_mem_gb": 7.7}
    assert rows["int4-mlp-g128-graphs"]["tpot_ms"] == round(1.43 * 1.10, 3)
    assert "bf16-stream-eager" not in rows
    merged = {**BUDGETS, "h200": rows}
    assert {c.kind for c in bud.applicable(merged, "h200", "bf16-stream-graphs")} == {
        "absolute", "efficiency", "ppl", "memory"}


def test_compare_reads_another_class_in_efficiencies(tmp_path, capsys):
    hist = tmp_path / "history"
    for i, t in enumerate((2.34, 2.36), start=1):  # H100: no copy bandwidth recorded
        write_run(hist / "h100", i, {"bf16-stream-graphs": {"tpot_ms": t, "bytes_per_token": 6e9},
                                     "bf16-stream-eager": {"tpot_ms": 30.0}},
                  gpu="NVIDIA H100 80GB HBM3")
    a800 = {"bf16-stream-graphs": {"tpot_ms": 4.0, "bytes_per_token": 6e9, "copy_gbps": 1800.0},
            "bf16-stream-eager": {"tpot_ms": 36.0}}
    write_run(hist / "a800", 1, a800, gpu="NVIDIA A800-SXM4-80GB")
    args = ["--storage", str(hist / "a800"), "--baselines", str(tmp_path / "none")]
    assert cmp.main(args) == 0  # one A800 run: read against the H100 history, not gated
    out = capsys.readouterr().out
    assert "against h100 (mean of the last 2 h100 run(s)" in out
    # H100's from the mean TPOT at [meta.copy_gbps] h100 = 3,004 GB/s: 0.850 -> 0.833
    eff_a800, eff_h100 = 6e9 / 1800e9 / 4e-3, 6e9 / 3004e9 / 2.35e-3
    line = [x for x in out.splitlines() if "bf16-stream-graphs       efficiency" in x][0]
    assert line.split()[:6] == ["SAME", "bf16-stream-graphs", "efficiency", f"{eff_h100:.4g}",
                                "->", f"{eff_a800:.4g}"]
    assert "ref_ratio" in out and "tpot_ms" not in out  # no times across classes
    # A second A800 run: timed against the first (same class), and read against --against.
    write_run(hist / "a800", 2, {**a800, "bf16-stream-graphs": {**a800["bf16-stream-graphs"],
                                                                "tpot_ms": 4.4}},
              gpu="NVIDIA A800-SXM4-80GB")
    assert cmp.main([*args, "--against", "h100"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION  bf16-stream-graphs       tpot_ms" in out and "against h100" in out


def test_bench_records_read_against_the_suite_run(tmp_path, capsys):
    """compare --bench: each bench record beside the suite's TPOT of the registry
    configuration it matches (cache, compile mode, stored format; not the int4 method)."""
    hist = tmp_path / "h200"
    write_run(hist, 1, {"bf16-stream-graphs": {"tpot_ms": 1.80},
                        "int4-mlp-g128-graphs": {"tpot_ms": 1.50}})
    cache = {"policy": "streaming", "sink": 4, "window": 2048, "compress_every": 1,
             "position_mode": "cache", "kv_dtype": "auto"}

    def record(name, tpot_ms, **config):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"config": {"model": "pythia-2.8b", "cache": cache,
                                               "compile": "graphs", "quant": None, **config},
                                    "result": {"tpot_ms": {"median": tpot_ms}}}))
        return str(path)

    ok = [record("bf16", 1.83), record("int4", 1.52, quant="int4-mlp-g128-search")]
    args = ["--storage", str(hist), "--bench"]
    assert cmp.main([*args, ",".join(ok)]) == 0
    out = capsys.readouterr().out
    assert "AGREE       bf16-stream-graphs       suite 1.800 bench 1.830 (+1.7%)" in out
    assert "AGREE       int4-mlp-g128-graphs" in out
    assert cmp.main([*args, record("int8", 1.4, quant="int8-all")]) == 1
    assert "UNMATCHED" in capsys.readouterr().out  # int8 is not in that suite run
    assert cmp.main([*args, record("slow", 1.9)]) == 1
    assert "DISAGREE    bf16-stream-graphs" in capsys.readouterr().out


def test_bench_and_suite_take_tpot_the_same_way(capsys):
    """Both call tpot.time_config with its defaults; the bench's flags default to them."""
    from fastdecode.cli import build_parser
    from fastdecode.commands.bench import decode_len

    args = build_parser().parse_args(["bench", "--model", "tiny-neox"])
    assert (decode_len(args), args.warmup_tokens) == (tpot.DECODE_LEN, tpot.WARMUP_TOKENS)
    suite = (ROOT / "tests" / "perf" / "test_decode_perf.py").read_text()
    assert "time_config(lm, cfg.speed_cache, cfg.compile.mode" in suite
    assert "decode_len" not in suite.split("time_config(")[1].split(")")[0]
    lm, _ = tiny()
    cfg = CacheConfig(policy="streaming", sink=2, window=6)
    dec, step, run = tpot.time_config(lm, cfg, "none", decode_len=12, warmup_tokens=4,
                                      copy_gbps=100.0)
    assert run.prompt_len == tpot.default_prompt_len(cfg) == 8 and run.steady
    assert run.steady_tokens == len(run.steady_times_ms) == 8
    assert run.tpot_ms["median"] == statistics.median(run.steady_times_ms)
    assert run.efficiency == pytest.approx(roofline.efficiency(
        run.bytes_per_token["total"], run.tpot_ms["median"], 100.0))
    assert "steady_times_ms" not in run.to_dict()


def test_gpu_workflow_runs_the_suite_then_compare():
    """The self-hosted runner runs what it ran before the efficiency budgets."""
    text = (ROOT / ".github" / "workflows" / "gpu.yml").read_text()
    runs = [line.split("run:", 1)[1].strip() for line in text.splitlines()
            if line.strip().startswith("run:")]
    assert runs == ["nvidia-smi", "python -m nox -s gpu", "python -m nox -s compare"]
    assert "a800" in text


def test_every_registry_configuration_has_a_budget_for_any_card():
    """Graphed steps an efficiency budget, the others a ratio budget: a card nobody measured
    is gated on every configuration (a new configuration needs its [any.<name>] table)."""
    from fastdecode import registry

    missing = [f"[any.{n}] {'min_efficiency' if c.compile.mode == 'graphs' else 'max_ratio'}"
               for n, c in registry.CONFIGS.items()
               if ("min_efficiency" if c.compile.mode == "graphs" else "max_ratio")
               not in BUDGETS["any"].get(n, {})]
    assert not missing, "perf/budgets.toml lacks " + ", ".join(missing)
    assert bud.reference(BUDGETS) in registry.CONFIGS
