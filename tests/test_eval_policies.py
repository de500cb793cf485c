"""`ppl` and `diagnose` for the policies outside the ring family (h2o, tova, refresh): the
evaluator equals the oracles' logits, score-based policies run token by token (and refuse
the parallel evaluator), refresh is exact in parallel; clear errors for bad budgets; the
commands on the bundled SmolLM2 (96 tokens: h2o and tova step token by token, and the
eager score caches are slow on the CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdecode import cli
from fastdecode.errors import ConfigError
from fastdecode.eval import EvalSpec, evaluate
from fastdecode.reference.h2o import h2o_logits
from fastdecode.reference.refresh import refresh_logits
from fastdecode.reference.tova import tova_logits


def _nll(logits, ids):
    return F.cross_entropy(logits.float(), ids[1:], reduction="none").double().numpy()


def _ids(n):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("family", ("tiny-neox", "tiny-llama"))
def test_evaluator_equals_oracles(tiny_models, family):
    model = tiny_models[family].model
    ids = _ids(26)
    cases = [
        (EvalSpec(mode="h2o", options=dict(heavy=3, recent=3, sink=1)),
         h2o_logits(model, ids[:-1], heavy=3, recent=3, sink=1).logits, 8),
        (EvalSpec(mode="tova", options=dict(budget=5, position_mode="cache")),
         tova_logits(model, ids[:-1], budget=5, position_mode="cache").logits, 6),
        (EvalSpec(mode="refresh", options=dict(sink=2, window=4, refresh=2, refresh_every=3,
                                               refresh_select="score"), chunk_size=5),
         refresh_logits(model, ids[:-1], sink=2, window=4, refresh=2, every=3,
                        select="score")[0], 2 + 4 + 2 + 1),
    ]
    for spec, logits, most in cases:
        got = evaluate(model, ids, spec)
        assert spec.method == ("parallel" if spec.mode == "refresh" else "token")
        np.testing.assert_allclose(got.nll, _nll(logits, ids), rtol=1e-4, atol=1e-5)
        assert got.kv_len.max() == most and got.kv_len[0] == 1
    tok = evaluate(model, ids, EvalSpec(**{**cases[2][0].to_dict(), "method": "token"}))
    np.testing.assert_allclose(tok.nll, _nll(cases[2][1], ids), rtol=1e-4, atol=1e-5)


def test_spec_validation_and_labels():
    with pytest.raises(ConfigError, match="parallel evaluator does not apply to h2o"):
        EvalSpec(mode="h2o", method="parallel")
    with pytest.raises(ConfigError, match="h2o cache: heavy must be >= 0"):
        EvalSpec(mode="h2o", options=dict(heavy=-1))
    with pytest.raises(ConfigError, match="tova cache: the budget"):
        EvalSpec(mode="tova", options=dict(budget=4, sink=4))
    with pytest.raises(ConfigError, match="refresh_every"):
        EvalSpec(mode="refresh", options=dict(refresh=9, refresh_every=8))
    with pytest.raises(ConfigError, match="options="):
        EvalSpec(mode="h2o", window=64)
    with pytest.raises(ConfigError, match="not options"):
        EvalSpec(mode="streaming", options=dict(heavy=3))
    spec = EvalSpec(mode="refresh", options=dict(sink=4, window=200, refresh=52))
    assert spec.label == ("refresh-sink4-window200-refresh52-refresh_every256-uniform-cache")
    assert spec.sink == 4 and spec.window == 200 and spec.position_mode == "cache"
    assert EvalSpec(**spec.to_dict()) == spec
    assert EvalSpec(mode="h2o", options=dict(heavy=8, recent=8)).label == \
        "h2o-heavy8-recent8-sink0-absolute"


def test_cli_errors_before_loading(capsys):
    def fails(*argv):
        assert cli.main(["ppl", "--model", "smollm2-135m", "--data", "pg19-10146",
                         *argv]) == 2
        return capsys.readouterr().err

    assert "parallel evaluator does not apply" in fails("--mode", "tova", "--method",
                                                        "parallel")
    assert "--heavy" in fails("--mode", "streaming", "--heavy", "4")
    assert "no option 'window'" in fails("--mode", "h2o", "--window", "4")
    assert "refresh_every" in fails("--mode", "refresh", "--refresh", "9",
                                    "--refresh-every", "4")


def test_smollm2_commands(smollm2, monkeypatch, tmp_path, capsys):
    import fastdecode.commands.ppl as ppl_cmd

    monkeypatch.setattr(ppl_cmd, "load", lambda args: smollm2)
    base = ["--model", "smollm2-135m", "--data", "pg19-10146", "--max-tokens", "96",
            "--no-progress", "--segment", "32"]
    ppls = {}
    for mode, extra in (("h2o", ["--heavy", "12", "--recent", "16", "--sink", "4"]),
                        ("tova", ["--budget", "32", "--sink", "4"]),
                        ("refresh", ["--window", "20", "--refresh", "8",
                                     "--refresh-every", "16", "--refresh-select", "score"])):
        out = tmp_path / f"{mode}.json"
        assert cli.main(["ppl", *base, "--mode", mode, *extra, "--json", str(out)]) == 0
        text = capsys.readouterr().out
        assert ("evaluated token by token" in text) == (mode != "refresh")
        rec = json.loads(out.read_text())
        assert rec["config"]["eval"]["mode"] == mode
        ppls[mode] = rec["result"]["ppl"]
        assert math.isfinite(ppls[mode]) and 3 < ppls[mode] < 200, (mode, ppls[mode])
    assert cli.main(["diagnose", *base, "--mode", "refresh", "--window", "20", "--refresh",
                     "8", "--refresh-every", "16", "--before", "8", "--after", "16",
                     "--smooth", "4", "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["diagnosis"]["reference"] == "dense" and d["diagnosis"]["events"]["count"] > 0


def test_study_configs_resume_and_table(monkeypatch, tmp_path):
    """Every study configuration holds its budget; a configuration with a record is not
    run again; the table and plot come from the records."""
    from fastdecode.eval import eviction
    from fastdecode.eval import run as run_mod

    specs = eviction.configs((256, 512))
    assert len({s.label for s in specs}) == len(specs) == 2 * 9
    assert all(eviction.budget_of(s) in (256, 512) for s in specs)
    assert {s.method for s in specs if s.mode in ("h2o", "tova")} == {"token"}
    ran = []

    def fake_run_one(lm, ids, data, spec, **kw):
        ran.append(spec.label)
        rec = {"config": {"eval": spec.to_dict(), "budget": kw["extra_config"]["budget"]},
               "data": {"source": "book"}, "result": {"ppl": 10.0 + len(ran)}}
        return type("R", (), {"spec": spec, "ppl": 1.0, "mean_nll": 0.0, "n": 1,
                              "seconds": 1.0})(), rec

    monkeypatch.setattr(run_mod, "prepare_tokens", lambda lm, book, n: ([1, 2], {}))
    monkeypatch.setattr(run_mod, "run_one", fake_run_one)
    paths = eviction.run(None, specs[:3], books=["book"], tokens=8, out=tmp_path,
                         dtype="float32", log=lambda s: None, prefix="cpu")
    assert len(ran) == 3 and all(p.exists() for p in paths)
    eviction.run(None, specs[:4], books=["book"], tokens=8, out=tmp_path, dtype="float32",
                 log=lambda s: None, prefix="cpu")
    assert len(ran) == 4  # the first three were kept, only the new one ran
    table = eviction.table(eviction.load_records(paths + [eviction.record_path(
        tmp_path, "book", 8, "float32", specs[3])]))
    assert "| streaming | 11.00 |" in table and "refresh uniform R=B/4" in table
    # with a TPOT record (scripts/eviction_tpot.py): a TPOT column per budget
    tpot = {"rows": [{"policy": "streaming", "budget": 256, "tpot_ms": 1.5},
                     {"policy": "h2o", "budget": 256, "tpot_ms": None}]}
    with_tpot = eviction.table(eviction.load_records(paths), tpot)
    assert "| TPOT 256 |" in with_tpot and "| streaming | 11.00 | 1.500 |" in with_tpot
    pytest.importorskip("matplotlib")
    assert eviction.plot(eviction.load_records(paths), tmp_path / "p.png").stat().st_size
    assert eviction.plot(eviction.load_records(paths), tmp_path / "q.png", tpot).stat().st_size


def test_every_registry_ppl_cache_is_evaluated_as_itself():
    """The perf suite's PPL step (EvalSpec.for_policy) runs each registry configuration's
    ppl_cache through the very cache it names; score policies token by token."""
    from fastdecode import registry
    from fastdecode.eval.ppl import EvalSpec

    for name, cfg in registry.CONFIGS.items():
        c = cfg.ppl_cache
        spec = EvalSpec.for_policy(c)
        got = spec.cache_config(8192).to_dict()
        want = c.to_dict()
        if c.policy == "dense":  # sized by the text, not by the registry
            got.pop("max_len"), want.pop("max_len")
        assert got == want, name
        scored = getattr(c.cache_class, "score_based", False)
        assert spec.method == ("token" if scored else "parallel"), name
