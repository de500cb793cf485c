"""Smoke tests on the real model (SmolLM2-135M, bundled): a few hundred tokens of PG19,
parallel vs token by token, the `ppl`/`diagnose` commands and the sweep script, small.

The long runs (16k tokens, recompute) are not CI: see docs/ppl.md."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fastdecode import cli
from fastdecode.eval import EvalSpec, evaluate
from fastdecode.eval.run import prepare_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_uses(smollm2, monkeypatch):
    """Make the commands use the already-loaded model (loading takes 10-25 s)."""
    import fastdecode.commands.ppl as ppl_cmd

    monkeypatch.setattr(ppl_cmd, "load", lambda args: smollm2)
    return smollm2


def test_smoke_parallel_equals_token_by_token(smollm2):
    ids, data = prepare_tokens(smollm2, "pg19-10146", 160)  # evicting from token 68 on
    assert len(ids) == 161 and data["tokens_available"] > 50_000
    spec = EvalSpec(mode="streaming", sink=4, window=60, chunk_size=50)
    par = evaluate(smollm2.model, ids, spec)
    tok = evaluate(smollm2.model, ids, EvalSpec(**{**spec.to_dict(), "method": "token"}))
    assert math.isfinite(par.ppl) and 5 < par.ppl < 100, par.ppl
    assert abs(par.ppl / tok.ppl - 1) < 1e-4, (par.ppl, tok.ppl)
    assert float(np.max(np.abs(par.nll - tok.nll))) < 1e-3
    assert par.kv_len.max() == 4 + 60 + 1


def test_cli_ppl_writes_a_valid_record(cli_uses, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["ppl", "--model", "smollm2-135m", "--data", "pg19-10146",
                   "--max-tokens", "160", "--mode", "streaming", "--sink", "4", "--window",
                   "60", "--compress-every", "8", "--chunk-size", "64", "--segment", "64",
                   "--json", str(out), "--diagnose", "--before", "16", "--after", "32",
                   "--smooth", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "streaming-4+60-R8: ppl" in printed and "eviction events" in printed
    rec = json.loads(out.read_text())
    assert rec["kind"] == "fastdecode.ppl" and rec["version"] == 1
    assert rec["config"]["eval"]["mode"] == "streaming" and rec["config"]["dtype"] == "float32"
    assert rec["config"]["label"] == "streaming-4+60-R8"
    assert rec["data"]["source"] == "pg19-10146" and rec["data"]["path"].endswith("10146.txt")
    env = rec["environment"]
    assert env["torch"] and "transformers" in env and env["device"] == "cpu" and "git" in env
    res = rec["result"]
    assert res["tokens_scored"] == 160 and math.isfinite(res["ppl"]) and res["ppl"] < 100
    assert len(res["segments"]["ppl"]) == 3 and res["max_kv_len"] == 4 + 60 + 8
    per = Path(rec["per_token"]["path"])
    assert per.name == "r.nll.csv" and per.is_file()
    assert len(per.read_text().strip().splitlines()) == 161  # header + one row a token
    diag = rec["diagnosis"]
    assert diag["events"]["count"] > 0 and diag["reference"] is None  # ppl: unpaired default
    assert diag["event_aligned"]["period"] == 8


def test_cli_diagnose_pairs_with_dense(cli_uses, tmp_path, capsys):
    out = tmp_path / "d.json"
    rc = cli.main(["diagnose", "--model", "smollm2-135m", "--data", "pg19-10146",
                   "--max-tokens", "128", "--mode", "window", "--window", "48",
                   "--json", str(out), "--per-token", str(tmp_path / "d.npz"),
                   "--before", "16", "--after", "32", "--smooth", "4", "--no-progress"])
    assert rc == 0
    rec = json.loads(out.read_text())
    diag = rec["diagnosis"]
    assert diag["reference"] == "dense" and diag["signal"] == "nll - reference"
    fe = diag["first_event"]
    assert fe["step"] == 49  # the first step that no longer sees token 0
    assert abs(fe["baseline"]) < 1e-3  # before it, a window sees exactly what dense sees
    assert rec["per_token"]["format"] == "npz" and Path(rec["per_token"]["path"]).is_file()
    assert "first event @ 49" in capsys.readouterr().out


def test_cli_errors_before_loading(monkeypatch, capsys, tmp_path):
    import fastdecode.commands.ppl as ppl_cmd

    def no_load(args):
        raise AssertionError("the model must not be loaded for a bad source")

    monkeypatch.setattr(ppl_cmd, "load", no_load)
    for data, msg in (("no/such/file.txt", "does not exist"),
                      ("pg19-oops", "unknown data source"),
                      (str(tmp_path), "not a dataset saved")):
        rc = cli.main(["ppl", "--model", "smollm2-135m", "--data", data])
        assert rc == 2
        assert msg in capsys.readouterr().err
    rc = cli.main(["ppl", "--model", "smollm2-135m", "--data", "pg19-10146", "--mode",
                   "window", "--sink", "4"])
    assert rc == 2 and "no sinks" in capsys.readouterr().err


def test_cli_too_short_text(cli_uses, tmp_path, capsys):
    p = tmp_path / "short.txt"
    p.write_text("Only a few words here.")
    rc = cli.main(["ppl", "--model", "smollm2-135m", "--data", str(p), "--max-tokens", "100"])
    assert rc == 2
    assert "tokens; scoring 100 needs 101" in capsys.readouterr().err


def _sweep_module():
    spec = importlib.util.spec_from_file_location("ppl_sweep", REPO / "scripts" / "ppl_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_script_end_to_end_small(smollm2, monkeypatch, tmp_path):
    import fastdecode.models

    monkeypatch.setattr(fastdecode.models, "load_model", lambda *a, **k: smollm2)
    sweep = _sweep_module()
    out = tmp_path / "sweep"
    argv = ["--max-tokens", "64", "--budgets", "16", "--sinks", "0,4", "--lazy", "1,8",
            "--device", "cpu", "--out", str(out), "--no-progress", "--segment", "32",
            "--plot-segment", "16", "--before", "8", "--after", "16", "--smooth", "2"]
    assert sweep.main(argv) == 0
    labels = ["dense", "window-16", "recompute-16", "streaming-4+12", "streaming-4+12-R8"]
    for label in labels:
        assert (out / f"{label}.json").is_file() and (out / f"{label}.nll.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["configs"]] == labels
    assert all(math.isfinite(r["ppl"]) for r in summary["configs"])
    assert summary["configs"][1]["mean_excess_nll_vs_dense"] is not None
    table = (out / "table.md").read_text()
    assert "| streaming-4+12-R8 |" in table and "python scripts/ppl_sweep.py" in table
    assert (out / "ppl_segments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a second run re-uses the records
    before = (out / "dense.json").stat().st_mtime_ns
    assert sweep.main(argv + ["--configs", "dense,window-*"]) == 0
    assert (out / "dense.json").stat().st_mtime_ns == before
