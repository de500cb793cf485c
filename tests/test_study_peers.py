"""The team's StreamingLLM peer (transformers eager, start+recent cache pruned by
concatenation, keys re-rotated at their slots: pos-shift) gives our streaming cache's
logits in ``cache`` position mode, strict and lazy, and their perplexity loop our PPL; the
torchao peers are skipped with a clear message when torchao is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.bench import peers, peers_team, peers_torchao
from fastdecode.cache import CacheConfig
from fastdecode.engine import Decoder
from fastdecode.eval.ppl import EvalSpec, evaluate
from fastdecode.models import load_model

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(1))


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_w = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.05 * torch.randn_like(p) if norm_w else 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["neox", "llama"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved checkpoint)."""
    if request.param == "neox":  # partial rotary, parallel residual
        cfg = transformers.GPTNeoXConfig(
            vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, rotary_pct=0.25, tie_word_embeddings=False,
            max_position_embeddings=256)
        hf = _randomize(transformers.GPTNeoXForCausalLM(cfg))
    else:  # grouped-query attention, tied head
        cfg = transformers.LlamaConfig(
            vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
            max_position_embeddings=256)
        hf = _randomize(transformers.LlamaForCausalLM(cfg))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_model(str(folder))


@pytest.mark.parametrize("lazy_every", [1, 4])
def test_team_streaming_is_our_cache_position_streaming(pair, lazy_every):
    hf, ours = pair
    S, W, P = 2, 6, 5  # evictions from step 4 on (lazy: every 4th step)
    dec = Decoder.build(ours.model, CacheConfig(policy="streaming", sink=S, window=W,
                                                compress_every=lazy_every), chunk_size=4)
    team = peers_team.TeamStreaming(hf, S, W, lazy_every)
    pairs = [(dec.prefill(IDS[:P]), team.step(IDS[:P]))]
    pairs += [(dec.step(IDS[t:t + 1]), team.step(IDS[t:t + 1])) for t in range(P, len(IDS))]
    for t, (a, b) in enumerate(pairs):
        assert float((a - b).norm() / a.norm()) < 1e-5, t
    assert team.held() <= S + W + lazy_every - 1
    # and it differs from a cache that keeps absolute positions (the check can fail)
    dec_abs = Decoder.build(ours.model, CacheConfig(policy="streaming", sink=S, window=W,
                                                    position_mode="absolute"), chunk_size=4)
    dec_abs.prefill(IDS[:P])
    last = [dec_abs.step(IDS[t:t + 1]) for t in range(P, len(IDS))][-1]
    if lazy_every == 1:
        assert float((last - pairs[-1][1]).norm() / last.norm()) > 1e-3


def test_team_perplexity_loop_is_our_streaming_ppl(pair):
    hf, ours = pair
    nll = peers_team.team_nll(hf, IDS, sink=2, window=6, lazy_every=1)
    ref = evaluate(ours.model, IDS, EvalSpec(mode="streaming", sink=2, window=6, chunk_size=8))
    assert nll.shape == ref.nll.shape
    assert abs(nll.mean() - ref.mean_nll) < 1e-5 * abs(ref.mean_nll)


def test_team_streaming_peer_times_its_decode(pair):
    hf, _ = pair
    r = peers.run_peer("team-streaming-lazy", hf, IDS[:20], 6, 2, streaming=(2, 8),
                       lazy_every=3)
    assert r["peer"] == "team-streaming-lazy" and r["lazy_every"] == 3
    assert r["tpot_ms"]["n"] == 4 and r["total_ms"] > r["ttft_ms"] > 0
    assert r["kv_len_at_end"] <= 2 + 8 + 3 - 1


def test_torchao_missing_is_a_skip_with_a_message(monkeypatch):
    from fastdecode.models import presets

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(peers_torchao.PeerUnavailable, match=r"torchao is not installed"):
        peers_torchao.torchao_quantize(torch.nn.Linear(4, 4), "int8")
    spec = presets.SHAPE_PRESETS["tiny-neox"]()
    out = peers.run_peers(["hf-torchao-int8", "hf-eager"], spec, torch.float32, "cpu",
                          IDS[:8] % spec.vocab_size, 4, 1, log=lambda *a: None)
    assert "torchao is not installed" in out["hf-torchao-int8"]["skipped"]
    assert out["hf-eager"]["tpot_ms"]["n"] == 3


def test_torchao_int8_peer_keeps_the_logits():
    pytest.importorskip("torchao")
    from fastdecode.models import presets

    hf = peers.hf_model(presets.SHAPE_PRESETS["small-neox"](), torch.float32, "cpu")
    ids = IDS[None, :16]
    with torch.no_grad():
        before = hf(ids).logits
        peers_torchao.torchao_quantize(hf, "int8")
        after = hf(ids).logits
    assert float((after - before).norm() / before.norm()) < 0.05


@settings(max_examples=8)
@given(sink=st.integers(0, 3), window=st.integers(1, 8), lazy_every=st.integers(1, 4),
       data=st.data())
def test_team_streaming_matches_on_random_windows(pair, sink, window, lazy_every, data):
    """Property: any sink, window, lazy period and prompt that fits the cache."""
    hf, ours = pair
    prompt = data.draw(st.integers(1, sink + window), label="prompt")
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 100), min_size=prompt + 12,
                                          max_size=prompt + 12), label="ids"))
    dec = Decoder.build(ours.model, CacheConfig(policy="streaming", sink=sink, window=window,
                                                compress_every=lazy_every), chunk_size=3)
    team = peers_team.TeamStreaming(hf, sink, window, lazy_every)
    a, b = dec.prefill(ids[:prompt]), team.step(ids[:prompt])
    for t in range(prompt, len(ids) + 1):
        assert float((a - b).norm() / a.norm()) < 1e-5, t
        if t < len(ids):
            a, b = dec.step(ids[t:t + 1]), team.step(ids[t:t + 1])
