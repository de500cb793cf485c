"""The refresh policy: fast cache == the re-rotating oracle (logits token by token and held
tokens, both families, both position modes, uniform and score selection, int8 KV, chunked
prefill), its invariants on random streams, validation, the compiled step and the fused
step's refusal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.cache import CacheConfig, RefreshConfig, make_cache
from fastdecode.compile import compile_decoder
from fastdecode.engine import Decoder
from fastdecode.errors import ConfigError
from fastdecode.reference.refresh import refresh_logits

FAMILIES = ("tiny-neox", "tiny-llama")  # partial rotary + MHA; full rotary + GQA


def _tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def _oracle(model, toks, cfg: RefreshConfig, offset: int = 0):
    return refresh_logits(model, toks, sink=cfg.sink, window=cfg.window, refresh=cfg.refresh,
                          every=cfg.refresh_every, select=cfg.refresh_select,
                          position_mode=cfg.position_mode, position_offset=offset,
                          kv_int8=cfg.kv_dtype == "int8")


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@st.composite
def configs(draw):
    refresh = draw(st.integers(1, 3))
    return CacheConfig(policy="refresh", sink=draw(st.integers(0, 3)),
                       window=draw(st.integers(1, 5)), refresh=refresh,
                       refresh_every=draw(st.integers(refresh, 5)),
                       refresh_select=draw(st.sampled_from(("uniform", "score"))),
                       position_mode=draw(st.sampled_from(("cache", "absolute"))))


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(FAMILIES), cfg=configs(), n=st.integers(8, 22),
       chunk=st.integers(2, 9), seed=st.integers(0, 99))
def test_fast_equals_oracle(tiny_models, family, cfg, n, chunk, seed):
    model = tiny_models[family].model
    toks = _tokens(seed, n)
    want, held = _oracle(model, toks, cfg)
    dec = Decoder.build(model, cfg)
    for t, tok in enumerate(toks.tolist()):
        assert _rel(dec.step(tok), want[t]) < 1e-5, t
        assert dec.cache.held_by_head(t + 1) == held[t], t
    # Chunked prefill (cut at the refresh points) leaves what stepping leaves.
    dec = Decoder.build(model, cfg, chunk_size=chunk)
    assert _rel(dec.prefill(toks, all_logits=True), want) < 1e-5
    assert dec.cache.held_by_head(n) == held[-1]


@pytest.mark.parametrize("mode", ("cache", "absolute"))
def test_int8_kv_and_offset_equal_oracle(tiny_models, mode):
    """int8 storage (refreshed keys re-quantized at their rank in cache mode) and a stream
    that starts far into the text."""
    model = tiny_models["tiny-llama"].model
    cfg = CacheConfig(policy="refresh", sink=2, window=4, refresh=2, refresh_every=3,
                      refresh_select="score", position_mode=mode, kv_dtype="int8")
    toks = _tokens(3, 20)
    want, _ = _oracle(model, toks, cfg, offset=10**6)
    dec = Decoder(model, make_cache(cfg, model.spec, position_offset=10**6))
    got = torch.stack([dec.step(t) for t in toks.tolist()])
    assert _rel(got, want) < 1e-4


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), n=st.integers(1, 60), chunk=st.integers(1, 17))
def test_invariants(tiny_llama, cfg, n, chunk):
    """Never more than the budget, the sinks always held, every token at most once,
    refreshed tokens come from those evicted, refresh happens on schedule."""
    dec = Decoder.build(tiny_llama.model, cfg, chunk_size=chunk)
    S, W, B, E = cfg.sink, cfg.window, cfg.refresh, cfg.refresh_every
    toks = _tokens(n, n).tolist()
    dec.prefill(toks[: n // 2 + 1])
    for tok in toks[n // 2 + 1:]:
        dec.step(tok)
    for layer in dec.cache.held_by_head(n):
        for held in layer:
            assert len(held) <= cfg.budget and len(set(held)) == len(held)
            assert held[:min(n, S)] == list(range(min(n, S)))
            window = held[len(held) - min(max(n - S, 0), W):]
            assert window == list(range(n - len(window), n))
            back = held[min(n, S):len(held) - len(window)]
            last = (n - 1 - S - W) // E * E + S + W  # the last refresh step (if any)
            assert len(back) == (B if n - 1 - S - W >= E else 0)
            assert all(last - W - E <= j < last - W for j in back)  # its candidates


def test_refresh_changes_attention(tiny_llama):
    """Refresh is not streaming: the logits part once the first refresh lands, and not
    before."""
    from fastdecode.reference.streaming import streaming_logits

    model = tiny_llama.model
    toks = _tokens(1, 24)
    stream = streaming_logits(model, toks, sink=2, window=5)
    dec = Decoder.build(model, CacheConfig(policy="refresh", sink=2, window=5, refresh=2,
                                           refresh_every=3))
    got = torch.stack([dec.step(t) for t in toks.tolist()])
    first = 2 + 5 + 3
    assert _rel(got[:first], stream[:first]) < 1e-5
    assert (got[first:] - stream[first:]).abs().amax(-1).min() > 1e-4


def test_validation():
    with pytest.raises(ConfigError, match="refresh_every"):
        CacheConfig(policy="refresh", refresh=8, refresh_every=4)
    with pytest.raises(ConfigError, match="refresh must be >= 1"):
        CacheConfig(policy="refresh", refresh=0)
    with pytest.raises(ConfigError, match="refresh_select"):
        CacheConfig(policy="refresh", refresh_select="random")
    with pytest.raises(ConfigError, match="no option 'heavy'"):
        CacheConfig(policy="refresh", heavy=3)
    assert CacheConfig(policy="refresh", sink=4, window=200, refresh=52).budget == 256


def test_cli_flags():
    from fastdecode.cli import build_parser

    parser = build_parser()
    for cmd in (["generate", "--prompt", "x"], ["bench"], ["ppl", "--data", "x"],
                ["diagnose", "--data", "x"]):
        args = parser.parse_args([cmd[0], "--model", "tiny-llama", *cmd[1:],
                                  "--refresh", "8", "--refresh-every", "32",
                                  "--refresh-select", "score"])
        assert (args.refresh, args.refresh_every, args.refresh_select) == (8, 32, "score")


def test_compiled_step_matches_eager(tiny_neox):
    """torch.compile (fullgraph, static shapes) takes the refresh step, refresh flag and
    all; the fused step refuses the policy with a clear error."""
    model = tiny_neox.model
    cfg = CacheConfig(policy="refresh", sink=2, window=4, refresh=2, refresh_every=3,
                      refresh_select="score", kv_dtype="int8")
    ref, dec = Decoder.build(model, cfg), Decoder.build(model, cfg)
    with pytest.raises(ConfigError, match="fused decode step does not run the refresh"):
        compile_decoder(dec, "default", kernels="fused")
    step = compile_decoder(dec, "default")
    assert step.attention == "inductor"
    toks = _tokens(5, 20).tolist()
    torch.testing.assert_close(dec.prefill(toks[:5]), ref.prefill(toks[:5]))
    for tok in toks[5:]:
        torch.testing.assert_close(dec.step(tok), ref.step(tok), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_match_eager_cuda(tiny_model_factory):
    """One CUDA graph: refresh flag, selection and refill replay inside it."""
    lm = tiny_model_factory("tiny-llama")
    model = lm.model.to("cuda")
    try:
        for select in ("uniform", "score"):
            cfg = CacheConfig(policy="refresh", sink=2, window=6, refresh=2, refresh_every=4,
                              refresh_select=select)
            ref, dec = Decoder.build(model, cfg), Decoder.build(model, cfg)
            step = compile_decoder(dec, "graphs")
            assert step.graph is not None and step.kernels == "inductor"
            toks = _tokens(7, 40).cuda()
            torch.testing.assert_close(dec.prefill(toks[:5]), ref.prefill(toks[:5]))
            for tok in toks[5:]:
                a, b = ref.step(tok.reshape(1)), dec.step(tok.reshape(1))
                assert ((a - b).norm() / a.norm()).item() < 1e-3
    finally:
        lm.model.to("cpu")


REFRESH_FLAGS = ["--policy", "refresh", "--sink", "2", "--window", "12", "--refresh", "4",
                 "--refresh-every", "8", "--refresh-select", "score"]


def test_cli_commands_run_refresh(smollm2, monkeypatch, tmp_path, capsys):
    """generate and bench run the policy from its flags (ppl and diagnose:
    test_eval_policies.test_smollm2_commands; study: the registry's bf16-refresh-*
    configurations, test_registry)."""
    import json

    from fastdecode import cli, registry
    from fastdecode.commands import generate as gen_cmd

    monkeypatch.setattr(gen_cmd, "load", lambda args: smollm2)
    assert cli.main(["generate", "--model", "smollm2-135m", "--prompt", "The sink of " * 8,
                     "--max-new-tokens", "12", "--device", "cpu", *REFRESH_FLAGS]) == 0
    assert len(capsys.readouterr().out) > 24
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--model", "tiny-llama", "--device", "cpu", "--compile", "none",
                     "--prompt-len", "24", "--decode-len", "8", "--warmup-tokens", "2",
                     *REFRESH_FLAGS, "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert '"refresh_select": "score"' in json.dumps(rec) and '"refresh": 4' in json.dumps(rec)
    assert {registry.get(f"bf16-refresh-{s}-graphs").speed_cache.refresh_select
            for s in ("uniform", "score")} == {"uniform", "score"}


@pytest.mark.parametrize("cmd", (["generate", "--prompt", "x"], ["bench"],
                                 ["diagnose", "--data", "pg19-10146"]))
def test_cli_bad_refresh_values(cmd, capsys):
    """Bad values: one error line naming the option, status 2, before any model loads."""
    from fastdecode import cli

    base = [cmd[0], "--model", "no-such-model", *cmd[1:]]
    pol = ["--policy", "refresh"] if cmd[0] != "diagnose" else ["--mode", "refresh"]
    for bad, msg in ((["--refresh", "0"], "refresh must be >= 1"),
                     (["--refresh", "9", "--refresh-every", "4"], "refresh_every"),
                     (["--refresh-every", "0"], "refresh_every must be >= 1"),
                     (["--heavy", "3"], "heavy")):
        assert cli.main(base + pol + bad) == 2, bad
        err = capsys.readouterr().err
        assert msg in err and "no-such-model" not in err, (bad, err)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main(base + pol + ["--refresh-select", "random"])
