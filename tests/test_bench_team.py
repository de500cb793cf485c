"""Same-run tables of several configurations: ``fastdecode bench --preset h2o-team`` (the
team's three modes) and ``scripts/gpu_h2o_bench.py`` (streaming vs H2O per weight format),
run on the CPU at toy sizes (the GPU numbers: ``scripts/gpu_bench.sh h2o``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fastdecode.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_h2o_team_preset_table_and_record(tmp_path, capsys):
    out = tmp_path / "team.json"
    rc = main(["bench", "--preset", "h2o-team", "--model", "tiny-neox", "--random-weights",
               "--device", "cpu", "--prompt-len", "12", "--decode-len", "5",
               "--warmup-tokens", "1", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert list(rows) == ["float32 full", "int8 full", "int8 + H2O 252/252"]
    assert rec["preset"] == "h2o-team" and rec["config"]["prompt_len"] == 12
    full, q8, h2o = rows.values()
    assert full["quant"] is None and q8["quant"] == h2o["quant"] == "int8"
    assert full["cache"]["policy"] == "dense" and full["cache"]["max_len"] == 12 + 5
    assert h2o["cache"]["policy"] == "h2o" and h2o["cache"]["heavy"] == 252 \
        and h2o["cache"]["recent"] == 252 and h2o["cache"]["sink"] == 0
    for r in rows.values():
        assert r["decode_len"] == 5 and r["tpot_ms"]["median"] > 0 and r["total_ms"] > 0
    # int8 weights read fewer bytes than float32 ones
    assert q8["bytes_per_token"]["weights"] < full["bytes_per_token"]["weights"]
    text = capsys.readouterr().out
    assert "TPOT med" in text and "peak GB" in text and "int8 + H2O 252/252" in text


def test_preset_rejects_bad_lengths(capsys):
    assert main(["bench", "--preset", "h2o-team", "--model", "tiny-neox", "--device", "cpu",
                 "--decode-len", "1"]) == 2


def test_h2o_vs_streaming_script_same_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_h2o_bench",
                                                  ROOT / "scripts" / "gpu_h2o_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "pairs.json"
    rc = mod.main(["--model", "tiny-neox", "--dtype", "float32", "--device", "cpu",
                   "--compile", "none", "--recipes", "float32,int8", "--window", "8",
                   "--decode-len", "4", "--warmup-tokens", "1", "--rounds", "2",
                   "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert list(rec["rows"]) == ["float32 streaming 4+8", "float32 h2o 4+4+4",
                                 "int8 streaming 4+8", "int8 h2o 4+4+4"]
    for r in rec["rows"].values():
        assert len(r["rounds_tpot_median_ms"]) == 2 and r["prompt_len"] == 12
    assert set(rec["ratios"]) == {"float32 h2o 4+4+4", "int8 h2o 4+4+4"}
    for r in rec["ratios"].values():
        assert r["ratio"] > 0 and r["met"] == (r["ratio"] <= 1.05)
    assert "target <= 1.05" in capsys.readouterr().out
