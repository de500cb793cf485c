"""`fastdecode bench` on the CPU: the record has every figure the issue asks for, steady
state is honoured, and the statistics helpers are right."""

from __future__ import annotations

import json

import pytest

from fastdecode.bench import tpot
from fastdecode.cli import main


def test_stats_and_targets():
    s = tpot.stats_ms([float(x) for x in range(1, 11)])
    assert s["median"] == 5.5 and s["p90"] == 9.0 and s["mean"] == 5.5 and s["n"] == 10
    t = tpot.target("tpot_ms", 2.5, 2.4, lower_is_better=True)
    assert t["met"] is False and abs(t["miss_by"] - 0.1) < 1e-12
    t = tpot.target("speedup", 1.5, 2.0, lower_is_better=False)
    assert t["met"] is False and abs(t["miss_by_rel"] - 0.25) < 1e-12
    assert tpot.target("x", None, 1.0, True)["met"] is None
    assert tpot.kernel_category("triton_red_fused_addmm_gelu_3") == "gemv"
    assert tpot.kernel_category("triton_per_fused__softmax_bmm_1") == "attention"
    assert tpot.kernel_category("split_kernel") == "attention"
    assert tpot.kernel_category("triton_poi_fused_add_addmm_cat_cos_mul_sin_3") == "pointwise"
    assert tpot.kernel_category("triton_red_fused_native_layer_norm_10") == "norm"


def test_bench_record(tmp_path, capsys):
    out = tmp_path / "rec.json"
    trace = tmp_path / "trace.json"
    rc = main(["bench", "--model", "tiny-neox", "--device", "cpu", "--window", "12",
               "--sink", "2", "--prompt-len", "10", "--decode-len", "16",
               "--warmup-tokens", "3", "--compile", "none", "--sweep-prompts", "3,20",
               "--sweep-decode-len", "6", "--sweep-warmup-tokens", "1",
               "--profile", str(trace), "--profile-steps", "2", "--peers", "hf-eager",
               "--peer-prompt-len", "8", "--peer-decode-len", "6", "--peer-warmup-tokens", "1",
               "--target-tpot-ms", "1000", "--target-vs-eager", "0.0001",
               "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    r = rec["result"]
    for key in ("mean", "median", "p90"):
        assert r["tpot_ms"][key] > 0
    assert r["prefill_ms"] > 0 and r["total_ms"] >= r["prefill_ms"] and r["tokens_per_s"] > 0
    # 10 prompt tokens, cache full (2 + 12) from position 13: steps 3.. are steady.
    assert r["steady"] and r["steady_tokens"] == 16 - 3
    b = r["bytes_per_token"]
    assert b["total"] == b["weights"] + b["kv"] > 0 and r["achieved_gbps"] > 0
    assert rec["config"]["compile"] == "none" and rec["env"]["torch"]
    assert [row["prompt_len"] for row in rec["sweep_prompts"]] == [3, 20]
    assert rec["peers"]["hf-eager"]["ratio_vs_ours"] > 0
    assert {t["name"] for t in rec["targets"]} == {"tpot_ms", "speedup_vs_hf-eager"}
    assert all(t["met"] for t in rec["targets"])
    assert trace.exists() and rec["profile"]["steps"] == 2
    assert "ours none" in capsys.readouterr().out


def test_bench_errors(capsys):
    assert main(["bench", "--model", "tiny-neox", "--device", "cpu", "--peers", "vllm"]) == 2
    assert "unknown peer" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-neox", "--device", "cpu", "--decode-len", "1"]) == 2


@pytest.mark.parametrize("policy", ["dense"])
def test_bench_dense_room(policy, capsys):
    rc = main(["bench", "--model", "tiny-neox", "--device", "cpu", "--policy", policy,
               "--max-len", "16", "--prompt-len", "10", "--decode-len", "10",
               "--warmup-tokens", "2",
               "--compile", "none"])
    assert rc == 2 and "dense cache holds 16" in capsys.readouterr().err
