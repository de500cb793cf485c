"""Benchmark history, compare (regressions / improvements beyond the noise margin),
baselines, and the report plots — on pytest-benchmark JSON written here."""

import json

import pytest

from fastdecode.bench import compare as cmp
from fastdecode.bench.history import gpu_class, load_history
from fastdecode.bench.plots import pareto_front
from fastdecode.cli import main


def write_run(folder, i, tpots, ppl=None, gpu="NVIDIA H100 80GB HBM3"):
    benches = []
    for config, tpot in tpots.items():
        extra = {"config": config, "ppl_ratio": (ppl or {}).get(config, 1.0)}
        benches.append({"name": f"test_decode[{config}]", "params": {"config": config},
                        "stats": {"median": tpot / 1e3, "mean": tpot / 1e3}, "extra_info": extra})
    data = {"machine_info": {"gpu": gpu}, "commit_info": {"id": f"{i:07d}abcdef"},
            "datetime": f"2026-11-22T08:{i:02d}:00", "benchmarks": benches}
    path = folder / f"{i:04d}_run.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def budgets(tmp_path):
    p = tmp_path / "budgets.toml"
    p.write_text('[meta]\nnoise_margin = 0.03\n[h100.bf16-stream-graphs]\nnoise_margin = 0.05\n')
    return p


def test_gpu_class():
    assert gpu_class("NVIDIA A800-SXM4-80GB") == "a800"
    assert gpu_class("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_class("Some Card") == "some-card"


def test_compare_flags_regressions_and_improvements(tmp_path, budgets, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"bf16-stream-graphs": 2.30, "int8-all-graphs": 1.50})
    write_run(hist, 2, {"bf16-stream-graphs": 2.40, "int8-all-graphs": 1.40})
    # bf16 +4.3% is inside its own 5% margin; int8 -6.7% is an improvement.
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert "IMPROVEMENT int8-all-graphs" in out and "SAME        bf16-stream-graphs" in out
    write_run(hist, 3, {"bf16-stream-graphs": 2.60, "int8-all-graphs": 1.41})
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets)]) == 1
    assert "REGRESSION  bf16-stream-graphs" in capsys.readouterr().out


def test_recorded_baseline_is_mean_of_runs(tmp_path, budgets, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    for i, t in enumerate((2.0, 2.2, 2.4), start=1):
        write_run(hist, i, {"bf16-stream-graphs": t})
    base = tmp_path / "base.json"
    assert cmp.main(["--storage", str(hist), "--record-baseline", "3",
                     "--baseline", str(base)]) == 0
    assert json.loads(base.read_text())["configs"]["bf16-stream-graphs"]["tpot_ms"] == \
        pytest.approx(2.2)
    write_run(hist, 4, {"bf16-stream-graphs": 2.35})  # +6.8% vs the mean, margin 5%
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets),
                     "--baseline", str(base)]) == 1


def test_compare_errors_are_clear(tmp_path, capsys):
    assert cmp.main(["--storage", str(tmp_path / "nowhere")]) == 2
    assert "no benchmark history" in capsys.readouterr().err


def test_pareto_front():
    pts = [("a", 1.0, 1.10), ("b", 2.0, 1.00), ("c", 2.5, 1.05), ("d", 1.5, 1.02)]
    assert sorted(pareto_front(pts)) == ["a", "b", "d"]


def test_report_writes_pngs(tmp_path):
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"bf16-stream-graphs": 2.3, "window-512-graphs": 2.0,
                        "window-1024-graphs": 2.1, "int8-all-graphs": 1.5},
              ppl={"int8-all-graphs": 1.002})
    assert main(["report", "--history", str(hist), "--out", str(tmp_path / "img")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "img").glob("*.png"))
    assert pngs == ["pareto-h100.png", "tpot-history-h100.png", "tpot-vs-window-h100.png"]
    write_run(hist, 2, {"bf16-stream-graphs": 2.25, "int8-all-graphs": 1.45})
    assert main(["report", "--history", str(hist), "--out", str(tmp_path / "img2")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "img2").glob("*.png"))
    assert pngs == ["pareto-h100.png", "tpot-history-h100.png"]  # one window: no curve
    for p in (tmp_path / "img").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = load_history(hist).runs
    assert [r.commit[:7] for r in runs] == ["0000001", "0000002"]
