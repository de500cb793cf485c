"""Issue 21, "nothing lost, nothing silently wrong": every case the hostile-user probe found
is a one-line error (exit code 2) naming the problem, raised before any model is loaded
where it can be, and nothing the user had is changed. Also the NaN/Inf guards of
generation and benchmarks (with a property test holding the guarded generate equal to a
plain sampling loop) and benchmark history keyed by GPU class."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fastdecode.bench import compare as cmp
from fastdecode.cache import CacheConfig
from fastdecode.cli import build_parser, main
from fastdecode.engine import Decoder, generate, sample
from fastdecode.errors import NonFiniteError
from fastdecode.models import load_model
from test_errors import neox_config, write_hf_dir
from test_perf_history import write_run


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str, *parts: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("fastdecode: warning")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastdecode {command}: error: "), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def snapshot(path) -> dict:
    """Every file under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command loads its model (checks must come first)."""
    import fastdecode.commands.bench as bench_cmd
    import fastdecode.commands.generate as gen_cmd
    import fastdecode.commands.ppl as ppl_cmd
    import fastdecode.commands.quantize as quant_cmd

    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    for mod in (bench_cmd, gen_cmd, ppl_cmd, quant_cmd):
        monkeypatch.setattr(mod, "load", refuse)


@pytest.fixture
def hf_model(tmp_path):
    return write_hf_dir(tmp_path / "model")


# --------------------------------------------------------------------- 1. quantize --out
@pytest.mark.parametrize("where", ["source", "inside-source", "around-source", "non-empty",
                                   "a-file", "under-a-file"])
def test_quantize_never_destroys_what_is_there(where, hf_model, tmp_path, no_load, capsys):
    """`quantize --out DIR` with DIR the source deleted the source model (rc 0); a
    non-empty --out was replaced silently; a file or unwritable --out failed with a
    traceback after the work. Now: refused before the load, nothing touched."""
    victim = hf_model
    if where == "source":
        out, expect = hf_model, "is the source"
    elif where == "inside-source":
        out, expect = hf_model / "q", "lies inside it"
    elif where == "around-source":
        out, expect = tmp_path, "contains the source"
    elif where == "non-empty":
        victim = out = tmp_path / "results"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expect = "is not empty (pass --force"
    elif where == "a-file":
        victim = out = tmp_path / "file.txt"
        out.write_text("mine")
        expect = "exists and is not a directory"
    else:
        victim = tmp_path / "file.txt"
        victim.write_text("mine")
        out, expect = victim / "q", "is a file, not a directory"
    before = snapshot(victim)
    flags = ["--force"] if where in ("source", "around-source") else []  # force never helps
    code, _, err = cli(["quantize", "--model", str(hf_model), "--recipe", "int8",
                        "--device", "cpu", "--out", str(out), *flags], capsys)
    one_line_error(code, err, "quantize", str(out), expect)
    assert snapshot(victim) == before


def test_quantize_force_replaces_and_the_result_loads(tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, stdout, err = cli(["quantize", "--model", "tiny-llama", "--recipe", "int8",
                             "--device", "cpu", "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["fastdecode.json", "model.safetensors"]
    assert load_model(str(out)).quant.name == "int8-all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp dirs left


# --------------------------------------------------------------------- 2. record paths
RECORD_CASES = ["json-is-dir", "json-under-file", "per-token-is-json", "per-token-is-dir",
                "json-is-model-file"]


@pytest.mark.parametrize(("command", "case"), [
    (c, k) for c in ("ppl", "diagnose", "bench") for k in RECORD_CASES
    if not (c == "bench" and k.startswith("per-token"))])  # bench writes no per-token file
def test_record_paths_checked_before_the_work(command, case, tmp_path, hf_model, no_load,
                                              capsys):
    """A --json / --per-token that cannot be written was a traceback after the whole run,
    its results lost; --per-token equal to --json overwrote one with the other."""
    text = tmp_path / "text.txt"
    text.write_text("some words " * 50)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("mine")
    json_path, per_token = {
        "json-is-dir": (tmp_path / "adir", None),
        "json-under-file": (tmp_path / "afile" / "r.json", None),
        "per-token-is-json": (tmp_path / "r.json", tmp_path / "r.json"),
        "per-token-is-dir": (tmp_path / "r.json", tmp_path / "adir"),
        "json-is-model-file": (hf_model / "model.safetensors", None),
    }[case]
    expect = {"json-is-dir": "is a directory", "json-under-file": "is a file, not a directory",
              "per-token-is-json": "--json and --per-token are the same file",
              "per-token-is-dir": "is a directory",
              "json-is-model-file": "which this run reads"}[case]
    before = snapshot(tmp_path)
    argv = [command, "--model", str(hf_model), "--device", "cpu", "--json", str(json_path)]
    if command != "bench":
        argv += ["--data", str(text), "--max-tokens", "8"]
    if per_token is not None:
        argv += ["--per-token", str(per_token)]
    code, _, err = cli(argv, capsys)
    one_line_error(code, err, command, expect)
    assert snapshot(tmp_path) == before


def test_bench_profile_trace_path_checked(tmp_path, no_load, capsys):
    (tmp_path / "t.json").mkdir()
    code, _, err = cli(["bench", "--model", "tiny-neox", "--device", "cpu", "--profile",
                        str(tmp_path / "t.json")], capsys)
    one_line_error(code, err, "bench", "--profile file", "is a directory")
    code, _, err = cli(["bench", "--model", "tiny-neox", "--device", "cpu", "--profile",
                        str(tmp_path / "x.json"), "--json", str(tmp_path / "x.json")], capsys)
    one_line_error(code, err, "bench", "are the same file")


def test_ppl_default_per_token_path_checked(tmp_path, hf_model, no_load, capsys):
    """--per-token defaults to <json stem>.nll.csv: that path is checked too."""
    text = tmp_path / "text.txt"
    text.write_text("some words " * 50)
    (tmp_path / "r.nll.csv").mkdir()
    code, _, err = cli(["ppl", "--model", str(hf_model), "--device", "cpu", "--data",
                        str(text), "--json", str(tmp_path / "r.json")], capsys)
    one_line_error(code, err, "ppl", "r.nll.csv", "is a directory")


def test_a_write_failure_at_the_end_is_one_line(tmp_path, monkeypatch):
    """Disk full when the record is written: an OutputError naming the record (the CLI
    prints it as one line), and the previous record stays whole."""
    import errno

    from fastdecode import atomic
    from fastdecode.errors import OutputError
    from fastdecode.eval.record import write_json

    p = tmp_path / "r.json"
    write_json({"old": 1}, p)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write record .*r\.json: No space left"):
        write_json({"new": 1}, p)
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"old": 1}


# ------------------------------------------------------------ 7. checks before the load
@pytest.mark.parametrize(("argv", "expect"), [
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "1", "--top-k", "0"], "top_k must be >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "top_p must be in"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-2"], "--max-new-tokens must be >= 0"),
    (["diagnose", "--data", "DATA", "--before", "0"], "--before must be >= 1, got 0"),
    (["diagnose", "--data", "DATA", "--after", "-1"], "--after must be >= 1, got -1"),
    (["diagnose", "--data", "DATA", "--smooth", "0"], "--smooth must be >= 1, got 0"),
    (["ppl", "--data", "DATA", "--diagnose", "--smooth", "0"], "--smooth must be >= 1"),
    (["ppl", "--data", "DATA", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["bench", "--profile", "t.json", "--profile-steps", "0"], "--profile-steps must be >= 1"),
    (["bench", "--chunk-size", "0"], "chunk_size must be >= 1, got 0"),
    (["bench", "--check", "-1"], "--check must be >= 0"),
    (["bench", "--sweep-prompts", "8,0"], "--sweep-*: prompt length must be >= 1, got 0"),
    (["bench", "--sweep-windows", "0"], "--sweep-windows: window must be >= 1, got 0"),
    (["bench", "--sweep-windows", "8", "--sweep-decode-len", "1"], "decode length must be >= 2"),
    (["bench", "--peers", "hf-eager", "--peer-decode-len", "0"], "--peer-*: decode length"),
    (["bench", "--peers", "hf-eager", "--peer-warmup-tokens", "64"], "--peer-*: warm-up"),
    (["bench", "--quant", "int9"], "int9"),
    (["generate", "--prompt", "hi", "--chunk-size", "0"], "chunk_size must be >= 1, got 0"),
])
def test_argument_checks_run_before_the_load(argv, expect, tmp_path, no_load, capsys):
    text = tmp_path / "text.txt"
    text.write_text("some words " * 50)
    argv = [str(text) if a == "DATA" else str(tmp_path / a) if a == "t.json" else a
            for a in argv]
    code, _, err = cli([*argv, "--model", "tiny-neox", "--device", "cpu"], capsys)
    one_line_error(code, err, argv[0], expect)


def test_help_description_is_a_whole_sentence():
    desc = build_parser().description
    assert desc.endswith(".") and "exposes" not in desc and len(desc) > 40


# --------------------------------------------------------------------- 5. NaN / Inf
@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """An HF directory (with the NeoX tokenizer) whose weights hold one NaN."""
    d = write_hf_dir(tmp_path_factory.mktemp("nan") / "m",
                     cfg={**neox_config(), "vocab_size": 50304}, tokenizer=True)
    state = load_file(str(d / "model.safetensors"))
    state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"][3, 5] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-k", "5"]],
                         ids=["greedy", "sampling"])
def test_generate_refuses_nan_logits(nan_model, sampling, capsys):
    """Greedy printed end-of-text six times with rc 0; sampling crashed in
    torch.multinomial."""
    code, out, err = cli(["generate", "--model", str(nan_model), "--device", "cpu",
                          "--prompt", "Hello", "--max-new-tokens", "6", *sampling], capsys)
    one_line_error(code, err, "generate", "non-finite logits", "generation step 0",
                   "prompt's last token")
    assert out.strip() == "Hello"  # nothing generated


@pytest.mark.parametrize("method", ["parallel", "token"])
def test_ppl_refuses_nan_in_one_line(nan_model, method, tmp_path, capsys):
    """ppl checked, but its FloatingPointError was a traceback; no record is written."""
    text = tmp_path / "t.txt"
    text.write_text("some words in a row, " * 40)
    rec = tmp_path / "r.json"
    code, _, err = cli(["ppl", "--model", str(nan_model), "--device", "cpu", "--data",
                        str(text), "--max-tokens", "16", "--no-progress", "--method", method,
                        "--json", str(rec)], capsys)
    one_line_error(code, err, "ppl", "non-finite NLL at step 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_bench_refuses_nan_logits(nan_model, capsys):
    code, out, err = cli(["bench", "--model", str(nan_model), "--device", "cpu",
                          "--compile", "none", "--sink", "2", "--window", "8",
                          "--prompt-len", "6", "--decode-len", "4", "--warmup-tokens", "0"],
                         capsys)
    one_line_error(code, err, "bench", "non-finite", "6-token prefill")


def test_bench_check_finds_nan_in_the_cache():
    """A NaN that appears during the timed decode is found at the end, in the cache."""
    from fastdecode.bench import tpot
    from fastdecode.compile import compile_decoder

    lm = load_model("tiny-neox")
    dec = Decoder.build(lm.model, CacheConfig(policy="streaming", sink=2, window=8))
    step = compile_decoder(dec, "none")
    prompt = torch.arange(6)
    run = tpot.measure(step, dec, prompt=prompt, decode_len=4, warmup_tokens=0)
    assert run.all_tokens_ms["n"] == 4  # finite: measured
    dec.cache.storage.v.view(-1)[5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"KV cache v after 4 decode steps \(positions "
                                             r"6\.\.9; checked at the end"):
        tpot.check_finite(dec, torch.zeros(3), step, 4)


class ScriptedDecoder:
    """Stands in for a Decoder: returns the given logits, prefill first, one per step."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.t = rows, 0
        self.model = type("M", (), {"device": torch.device("cpu"), "dtype": torch.float32})()

    def prefill(self, prompt):
        self.t = len(prompt)
        return self.rows[0]

    def step(self, tok):
        self.t += 1
        return self.rows[self.t - 3]  # prompt of 3 tokens: step i returns row i


@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), vocab=st.integers(2, 40),
       temperature=st.sampled_from([0.0, 0.7, 1.5]), bad=st.none() | st.integers(0, 11),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_guarded_generate_equals_a_plain_sampling_loop(seed, n, vocab, temperature, bad,
                                                       value):
    """On finite logits the guard changes nothing: generate yields the tokens a plain loop
    over ``sample`` draws with the same generator. A NaN/Inf at step k: the first k tokens
    come out, then a NonFiniteError naming step k."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, vocab, generator=g) * 3
    if bad is not None and bad < n:
        rows[bad, int(torch.randint(vocab, (1,), generator=g))] = value
    ref_gen = torch.Generator().manual_seed(seed + 1)
    ref = []
    for i in range(n):
        if not torch.isfinite(rows[i]).all():
            break
        ref.append(int(sample(rows[i], temperature, None, None, ref_gen)))
    got = []
    stream = generate(ScriptedDecoder(rows), [1, 2, 3], n, temperature=temperature,
                      seed=seed + 1)
    if len(ref) == n:
        got = list(stream)
    else:
        with pytest.raises(NonFiniteError, match=rf"generation step {len(ref)} "):
            for tok in stream:
                got.append(tok)
    assert got == ref


def test_nan_mid_generation_names_the_step():
    lm = load_model("tiny-llama")
    dec = Decoder.build(lm.model, CacheConfig(policy="streaming", sink=2, window=8))
    real, calls = dec.step_fn, []

    def poisoned(tok, pos):
        calls.append(1)
        out = real(tok, pos)
        return out.fill_(float("nan")) if len(calls) == 3 else out

    dec.step_fn = poisoned
    got = []
    with pytest.raises(NonFiniteError, match=r"generation step 3 \(after generated token 3, "
                                             r"position 7\)"):
        for tok in generate(dec, [1, 2, 3, 4, 5], 10):
            got.append(tok)
    assert len(got) == 3


# --------------------------------------------------------------------- 6. history
@pytest.fixture
def budgets(tmp_path):
    p = tmp_path / "budgets.toml"
    p.write_text("[meta]\nnoise_margin = 0.03\n")
    return p


def test_compare_reads_only_one_gpu_class(tmp_path, budgets, capsys):
    """An A800 run after an H100 run gave 12 false regressions: now the A800 run is
    compared with A800 runs only, and the H100 run is reported as skipped."""
    hist = tmp_path / "hist"
    hist.mkdir()
    write_run(hist, 1, {"a": 2.0, "b": 1.0}, gpu="NVIDIA A800-SXM4-80GB")
    write_run(hist, 2, {"a": 1.0, "b": 0.5}, gpu="NVIDIA H100 80GB HBM3")
    write_run(hist, 3, {"a": 2.01, "b": 1.01}, gpu="NVIDIA A800-SXM4-80GB")
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert "0002_run.json: GPU class h100, not a800" in out
    assert "vs previous a800 run 0001_run.json" in out and "0 regression(s)" in out
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets), "--gpu", "h100"]) == 0
    assert "only one h100 run" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["list", "no-stats", "not-json", "bench-not-object"])
def test_a_bad_history_file_is_skipped_and_reported(bad, tmp_path, budgets, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"a": 2.0})
    write_run(hist, 3, {"a": 2.0})
    f = hist / "0002_bad.json"
    f.write_text({"list": "[1, 2, 3]", "not-json": "{",
                  "no-stats": json.dumps({"machine_info": {"gpu": "H100"}, "benchmarks": [
                      {"name": "test_decode[a]", "extra_info": {"config": "a"}}]}),
                  "bench-not-object": json.dumps({"benchmarks": [3]})}[bad])
    before = f.read_bytes()
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {f}" in out and "SAME" in out
    if bad == "list":  # report skips it too (once: plotting is slow)
        assert main(["report", "--history", str(hist), "--out", str(tmp_path / "img")]) == 0
        assert f"skipped {f}" in capsys.readouterr().out
    assert f.read_bytes() == before


@pytest.mark.parametrize("n", ["0", "-1", "99"])
def test_record_baseline_n_is_validated(n, tmp_path, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    for i in (1, 2, 3):
        write_run(hist, i, {"a": 2.0 + i})
    base = tmp_path / "base.json"
    assert cmp.main(["--storage", str(hist), "--record-baseline", n, "--baseline",
                     str(base)]) == 2
    assert f"--record-baseline N must be in 1..3 (the h100 runs under {hist}), got {n}" in \
        capsys.readouterr().err
    assert not base.exists()
    assert cmp.main(["--storage", str(hist), "--record-baseline", "2", "--baseline",
                     str(base)]) == 0
    assert json.loads(base.read_text())["configs"]["a"]["tpot_ms"] == pytest.approx(4.5)


@pytest.mark.parametrize("content", ["{", "[]", '{"configs": {"a": 3}}',
                                     '{"gpu": "a800", "configs": {"a": {"tpot_ms": 2.0}}}'])
def test_a_bad_baseline_is_one_line(content, tmp_path, budgets, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"a": 2.0})
    base = tmp_path / "base.json"
    base.write_text(content)
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets), "--baseline",
                     str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(base) in err
    assert base.read_text() == content


def test_a_missing_explicit_baseline_is_an_error(tmp_path, budgets, capsys):
    """--baseline FILE that does not exist fell back to the previous run without a word."""
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"a": 2.0})
    write_run(hist, 2, {"a": 2.0})
    assert cmp.main(["--storage", str(hist), "--budgets", str(budgets), "--baseline",
                     str(tmp_path / "typo.json")]) == 2
    assert "typo.json does not exist" in capsys.readouterr().err


def test_report_default_out_is_beside_the_history(tmp_path, monkeypatch, capsys):
    """`report` without --out wrote into ./docs/img of the working directory."""
    hist = tmp_path / "repo" / "perf" / "history" / "h100"
    hist.mkdir(parents=True)
    write_run(hist, 1, {"bf16-stream-graphs": 2.3})
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["report", "--history", str(hist)]) == 0
    assert (tmp_path / "repo" / "perf" / "plots" / "h100" / "tpot-history-h100.png").is_file()
    assert list(cwd.iterdir()) == []
    other = tmp_path / "loose"
    shutil.copytree(hist, other)
    code, _, err = cli(["report", "--history", str(other)], capsys)
    one_line_error(code, err, "report", "--out is needed")
    assert list(cwd.iterdir()) == []


def test_report_out_is_checked(tmp_path, capsys):
    hist = tmp_path / "h100"
    hist.mkdir()
    write_run(hist, 1, {"bf16-stream-graphs": 2.3})
    (tmp_path / "f").write_text("mine")
    code, _, err = cli(["report", "--history", str(hist), "--out", str(tmp_path / "f")],
                       capsys)
    one_line_error(code, err, "report", "exists and is not a directory")
    assert (tmp_path / "f").read_text() == "mine"
