"""`fastdecode study`: rows measured and recorded one by one, resumed after a kill without
losing or redoing any, baselines stored and reused while the timing code is unchanged, the
table's ratios, and PPL through policies eval.ppl does not know (token by token)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdecode import study
from fastdecode.cache import CacheConfig
from fastdecode.cli import main
from fastdecode.errors import ConfigError
from fastdecode.eval.data import DataSourceError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["study", "--model", "tiny-neox", "--device", "cpu", "--compile", "none",
        "--prompt-len", "24", "--new-tokens", "6", "--warmup-tokens", "1", "--ppl-tokens", "0"]


def test_tiny_study_baseline_is_stored_reused_and_refreshed(tmp_path, capsys):
    args = TINY + ["--configs", "bf16-stream-eager,lazy-r32-graphs,peer:team-streaming",
                   "--baseline", "bf16-stream-eager", "--baseline-runs", "2",
                   "--baseline-store", str(tmp_path / "base")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "baseline bf16-stream-eager: measuring (mean of 2 runs)" in out
    stored = list((tmp_path / "base").glob("bf16-stream-eager-*.json"))
    assert len(stored) == 1
    base = json.loads(stored[0].read_text())
    assert base["runs"] == 2 and len(base["speed"]["tpot_ms"]["runs"]) == 2
    assert base["code_hash"] == study.timing_code_hash()
    recs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "a" / "records").iterdir()}
    assert set(recs) == {"bf16-stream-eager", "lazy-r32-graphs", "peer_team-streaming"}
    assert recs["peer_team-streaming"]["speed"]["peer"] == "team-streaming"
    assert recs["bf16-stream-eager"]["speed"] == base["speed"]  # the baseline row is it
    for r in recs.values():
        assert r["speed"]["ttft_ms"] > 0 and r["speed"]["total_ms"] > r["speed"]["ttft_ms"]
    table = (tmp_path / "a" / "study.md").read_text()
    assert table.index("bf16-stream-eager (baseline)") < table.index("lazy-r32-graphs")
    assert "| 1.00x |" in table and "| peer:team-streaming |" in table
    # a new study on the same model, device and shapes reuses it ...
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "baseline bf16-stream-eager: reused" in capsys.readouterr().out
    assert json.loads(stored[0].read_text())["created"] == base["created"]
    # ... unless asked to refresh it
    assert main(args + ["--out", str(tmp_path / "c"), "--refresh-baseline"]) == 0
    assert "measuring (mean of 2 runs)" in capsys.readouterr().out
    assert json.loads(stored[0].read_text())["created"] > base["created"]
    # other arguments in the same directory: refused, nothing overwritten
    before = (tmp_path / "a" / "records" / "lazy-r32-graphs.json").read_bytes()
    if importlib.util.find_spec("torchao") is None:  # a missing optional peer: a skipped row
        assert main(TINY + ["--configs", "peer:hf-torchao-int8", "--out",
                            str(tmp_path / "d")]) == 0
        assert "skipped: torchao is not installed" in (tmp_path / "d" / "study.md").read_text()
    with pytest.raises(ConfigError, match="holds a study with other arguments .*shape"):
        study.run(study.Study(model="tiny-neox", configs=["lazy-r32-graphs"],
                              out=tmp_path / "a", prompt_len=30, new_tokens=6, warmup_tokens=1,
                              ppl_tokens=0, device="cpu", compile="none"), log=lambda *a: None)
    assert (tmp_path / "a" / "records" / "lazy-r32-graphs.json").read_bytes() == before


def test_baseline_validity_is_the_timing_code_the_versions_runs_and_age(tmp_path):
    rec = {"code_hash": study.timing_code_hash(), "versions": study.versions(), "runs": 3,
           "created": 1000.0}
    assert study.baseline_reusable(rec, 3, None) is None
    assert study.baseline_reusable(rec, 2, 1.0, now=1000.0 + 3600) is None
    assert "mean of 3 runs, 5 asked" in study.baseline_reusable(rec, 5, None)
    assert "days old" in study.baseline_reusable(rec, 3, 1.0, now=1000.0 + 2 * 86400)
    assert "code that affects timing" in study.baseline_reusable(rec | {"code_hash": "x"}, 1,
                                                                 None)
    assert "versions changed" in study.baseline_reusable(
        rec | {"versions": {"torch": "0"}}, 1, None)
    # the hash follows the timing modules, not the presentation ones
    pkg = tmp_path / "pkg"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "engine.py").write_text("x = 1\n")
    (pkg / "commands" / "bench.py").write_text("y = 1\n")
    h = study.timing_code_hash(pkg)
    (pkg / "commands" / "bench.py").write_text("y = 2\n")
    (pkg / "study.py").write_text("z = 2\n")
    assert study.timing_code_hash(pkg) == h
    (pkg / "engine.py").write_text("x = 2\n")
    assert study.timing_code_hash(pkg) != h


def test_bad_rows_and_sources_are_refused_before_any_work(tmp_path):
    def s(**kw):
        return study.Study(**({"model": "tiny-neox", "configs": ["bf16-stream-eager"],
                               "out": tmp_path / "o", "ppl_tokens": 0} | kw))

    with pytest.raises(ConfigError, match="unknown configuration 'bf16-nope'"):
        study.check(s(configs=["bf16-nope"]))
    with pytest.raises(ConfigError, match="unknown peer 'peer:vllm'.*peer:team-streaming"):
        study.check(s(configs=["peer:vllm"]))
    with pytest.raises(ConfigError, match="listed twice"):
        study.check(s(configs=["bf16-stream-eager"] * 2))
    with pytest.raises(DataSourceError, match="unknown data source"):
        study.check(s(ppl_tokens=10, data=("no-such-corpus",)))
    with pytest.raises(ConfigError, match="--new-tokens|decode-len"):
        study.check(s(new_tokens=1))
    s_ok = s(ppl_tokens=10)  # the defaults: PG19 and WikiText, where they are available
    study.check(s_ok)
    assert [t.name for t in s_ok.sources] == list(study.DEFAULT_DATA)


def test_ppl_through_a_policy_eval_does_not_know_runs_token_by_token(tiny_llama):
    ids = torch.randint(0, tiny_llama.spec.vocab_size, (60,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    pol = CacheConfig(policy="streaming", sink=2, window=9, compress_every=3)
    fast = study.ppl_through(tiny_llama.model, ids, pol)
    slow = study.ppl_through(tiny_llama.model, ids, pol, method="decoder")
    assert fast["method"].startswith("parallel") and slow["method"] == "token (streaming)"
    assert abs(fast["ppl"] - slow["ppl"]) < 1e-4 * fast["ppl"]
    h2o = study.ppl_through(tiny_llama.model, ids, CacheConfig(policy="h2o", sink=2, heavy=4,
                                                               recent=4))
    assert h2o["tokens"] == 59 and h2o["ppl"] > 1 and h2o["ppl"] != fast["ppl"]


def test_table_ratios_and_failed_rows():
    s = study.Study(model="m", configs=["a", "b"], out=Path("x"), baseline="a")
    s.sources = []
    row = {"speed": {"tpot_ms": {"median": 5.0}, "ttft_ms": 100.0, "total_ms": 2000.0,
                     "peak_mem_gb": 1.5}, "ppl": {}}
    base = {"runs": 3, "reused": True, "speed": {"tpot_ms": {"median": 20.0}, "ttft_ms": 50.0,
                                                 "total_ms": 8000.0}, "ppl": {}}
    t = study.markdown_table({"a": base, "b": row, "c": {"error": "RuntimeError: boom"}},
                             base, s)
    assert "| b | 5.000 | 4.00x | 100.0 | 2.00 | 1.50 |" in t
    assert "| c | FAILED: RuntimeError: boom |" in t and "mean of 3 runs (stored, reused)" in t


def _study_cmd(out: Path, store: Path) -> list[str]:
    return ["study", "--model", "smollm2-135m", "--device", "cpu", "--compile", "none",
            "--configs", "bf16-stream-eager,window-512-graphs", "--prompt-len", "32",
            "--new-tokens", "6", "--warmup-tokens", "1", "--ppl-tokens", "128",
            "--baseline", "bf16-stream-eager", "--baseline-store", str(store),
            "--out", str(out)]


def test_smollm2_study_killed_mid_row_resumes_and_loses_nothing(tmp_path, capsys):
    """The CI smoke test: two configurations on the bundled model; the process is killed
    (SIGKILL: no handler runs) while the second row is measured, then run again."""
    out, store = tmp_path / "study", tmp_path / "base"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastdecode.cli", *_study_cmd(out, store)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[2/2] window-512-graphs: measuring" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    text = "".join(lines)
    assert "[1/2] bf16-stream-eager" in text and proc.returncode == -signal.SIGKILL, text
    first = out / "records" / "bf16-stream-eager.json"
    kept = first.read_bytes()
    assert sorted(p.name for p in (out / "records").glob("*.json")) == [first.name]
    rec = json.loads(kept)
    assert set(rec["ppl"]) == set(study.DEFAULT_DATA) and rec["ppl"]["wikitext-2"]["ppl"] > 1
    assert rec["ppl"]["wikitext-2"]["method"].startswith("parallel")

    t0 = time.perf_counter()
    assert main(_study_cmd(out, store)) == 0
    resumed = capsys.readouterr().out
    assert "baseline bf16-stream-eager: reused" in resumed
    assert "[1/2] bf16-stream-eager: recorded earlier" in resumed
    assert "[2/2] window-512-graphs: measuring" in resumed and "ETA" in resumed
    assert first.read_bytes() == kept  # not measured again, not rewritten
    second = json.loads((out / "records" / "window-512-graphs.json").read_text())
    assert second["speed"]["tpot_ms"]["median"] > 0 and second["ppl"]["pg19-10146"]["ppl"] > 1
    table = (out / "study.md").read_text()
    assert "bf16-stream-eager (baseline)" in table and "| window-512-graphs |" in table
    assert time.perf_counter() - t0 < 120
