"""H2O and TOVA: the oracles against hand-worked examples, StreamingLLM and dense
attention; the fast slot/score caches against the oracles (logits, held tokens and scores
on the device, after every chunk and step), their invariants, dtypes, int8 storage and the
decode step's static, sync-free form.

Hand-worked examples use one KV head, head dim 1, no rotation, queries q = ±1 and keys
k_j = ln a_j: attention probabilities are then a_j / sum(a) (or 1/a_j normalised), so every
score below is a fraction derived on paper.
"""

from __future__ import annotations

import math
from fractions import Fraction as F

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.attention import attend
from fastdecode.cache import H2OConfig, TOVAConfig, make_cache
from fastdecode.compile import compile_decoder
from fastdecode.engine import Decoder
from fastdecode.errors import ConfigError, InputError
from fastdecode.reference.h2o import h2o_logits
from fastdecode.reference.scored import ScoredLayer
from fastdecode.reference.streaming import _rotate, dense_logits, streaming_logits
from fastdecode.reference.tova import tova_logits
from test_cache_properties import schedules  # the same chunk/step splits

FAMILIES = ("tiny-neox", "tiny-llama")
VOCAB = 97
TOL = 1e-5


# ------------------------------------------------------------------------------ helpers
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def tokens_for(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def reference(model, tokens, cfg, chunks=None, offset=0, kv_int8=False):
    kw = dict(position_mode=cfg.position_mode, position_offset=offset, chunks=chunks,
              kv_int8=kv_int8)
    if cfg.policy == "h2o":
        return h2o_logits(model, tokens, heavy=cfg.heavy, recent=cfg.recent, sink=cfg.sink,
                          **kw)
    return tova_logits(model, tokens, budget=cfg.budget, sink=cfg.sink, **kw)


def budget_of(cfg) -> int:
    return cfg.budget


def recent_of(cfg) -> int:
    return cfg.recent if cfg.policy == "h2o" else 0


def chunks_of(schedule) -> list[list[int]]:
    """Per schedule op, the chunk sizes the decoder feeds (prefill splits by chunk_size)."""
    out = []
    for kind, n, chunk in schedule:
        if kind == "step":
            out.append([1] * n)
        else:
            out.append([chunk] * (n // chunk) + ([n % chunk] if n % chunk else []))
    return out


def feed(dec: Decoder, tokens, schedule):
    pos = 0
    for kind, n, chunk in schedule:
        part = tokens[pos:pos + n]
        if kind == "prefill":
            dec.chunk_size = chunk
            out = dec.prefill(part, all_logits=True)
        else:
            out = torch.stack([dec.step(int(x)) for x in part])
        pos += n
        yield pos, out


def layer0_keys(model, tokens, offset):
    """Layer-0 keys rotated at their text position + offset: what any slot holding that
    token stores (layer 0 depends on no context)."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    with torch.no_grad():
        layer = model.layers[0]
        qkv = layer.attn.qkv(layer.norm1(model.embed(tokens)))
        k = qkv.view(len(tokens), H + 2 * Hkv, D).transpose(0, 1)[H:H + Hkv]
        return _rotate(k, torch.arange(len(tokens)) + offset, spec.rotary_dim, spec.rope_theta)


def check_state(cache, ref_state, cfg, t: int, G: int) -> None:
    """The device buffers hold what the oracle holds, with its scores, and the policy's
    invariants hold: at most the budget, sinks and the recent window always held, no token
    twice, TOVA's heads of a layer alike, the next write going to an empty slot."""
    B, S, R = budget_of(cfg), cfg.sink, recent_of(cfg)
    pos, score = cache.pos.tolist(), cache.score.cpu()
    for layer, (ref_pos, ref_score) in enumerate(ref_state):
        for h in range(cache.num_kv_heads):
            row = pos[layer][h]
            held = sorted(p for p in row if p >= 0)
            assert held == ref_pos[h].tolist(), (layer, h, t)
            assert len(held) == len(set(held)) == min(t, B)
            assert set(range(min(t, S))) <= set(held), "a sink was evicted"
            assert set(range(max(t - R, 0), t)) <= set(held), "a recent token was evicted"
            slot = [row.index(p) for p in held]
            torch.testing.assert_close(score[layer, h, slot], ref_score[h], rtol=1e-5,
                                       atol=1e-6, msg=f"scores, layer {layer} head {h} t={t}")
            assert row[int(cache.free[layer, h])] == -1, "the next write would evict a token"
            if t <= B:  # nothing evicted yet: every probability ever given is still held
                total = float(score[layer, h, slot].sum())
                expected = G * t if cfg.policy == "h2o" else 1.0
                assert math.isclose(total, expected, rel_tol=1e-5), (total, expected)
        if cfg.policy == "tova":
            assert all(sorted(pos[layer][h]) == sorted(pos[layer][0])
                       for h in range(cache.num_kv_heads))


# --------------------------------------------------------------- hand-worked oracle examples
def hand_layer(rule, budget, sink=0, recent=0):
    return ScoredLayer(num_kv_heads=1, rule=rule, budget=budget, sink=sink, recent=recent)


def feed_hand(layer, weights, signs=(1.0,)):
    """Feed tokens with key ln(a) one at a time (or as one chunk if ``weights`` is a tuple
    of lists); values = the token's text position. Returns the outputs [Hq, T, 1]."""
    outs = []
    for t, a in enumerate(weights):
        q = torch.tensor(signs, dtype=torch.float64).view(-1, 1, 1)
        k = torch.tensor([[[math.log(a)]]], dtype=torch.float64)
        v = torch.tensor([[[float(t)]]], dtype=torch.float64)
        outs.append(layer.attend(q, k, v, t))
    return outs


def state(layer):
    return layer.pos[0].tolist(), [F(x).limit_denominator(1000) for x in layer.score[0].tolist()]


def test_h2o_oracle_by_hand():
    """heavy 1 + recent 1, keys weighted 1, 2, 1, 4 (worked on paper):
    t=1: p=[1/3, 2/3], scores [4/3, 2/3]; t=2: p=[1/4, 1/2, 1/4] -> [19/12, 7/6, 1/4], token
    2 is recent, token 1 (7/6) goes; t=3 over {0, 2, 3}: p=[1/6, 1/6, 2/3] -> [7/4, 5/12,
    2/3], token 2 goes. The output at t=3 is 1/6*0 + 1/6*2 + 2/3*3 = 7/3."""
    layer = hand_layer("h2o", budget=2, recent=1)
    outs = feed_hand(layer, [1, 2, 1])
    assert state(layer) == ([0, 2], [F(19, 12), F(1, 4)])
    outs += feed_hand_at(layer, 4, t=3)
    assert state(layer) == ([0, 3], [F(7, 4), F(2, 3)])
    assert math.isclose(float(outs[-1]), 7 / 3, rel_tol=1e-6)


def feed_hand_at(layer, a, t, signs=(1.0,)):
    q = torch.tensor(signs, dtype=torch.float64).view(-1, 1, 1)
    k = torch.tensor([[[math.log(a)]]], dtype=torch.float64)
    return [layer.attend(q, k, torch.tensor([[[float(t)]]], dtype=torch.float64), t)]


def test_h2o_oracle_chunked_prefill_by_hand():
    """The same four tokens as one chunk: scores are the causal attention's column sums,
    rows [1], [1/3, 2/3], [1/4, 1/2, 1/4], [1/8, 1/4, 1/8, 1/2] -> [41/24, 17/12, 3/8, 1/2];
    token 3 is recent, of {0, 1, 2} the two lowest (3/8, then 17/12) go. Not the
    token-by-token state (token 0 has 41/24 here, 7/4 there)."""
    layer = hand_layer("h2o", budget=2, recent=1)
    k = torch.tensor([1.0, 2.0, 1.0, 4.0], dtype=torch.float64).log().view(1, 4, 1)
    v = torch.arange(4, dtype=torch.float64).view(1, 4, 1)
    layer.attend(torch.ones(1, 4, 1, dtype=torch.float64), k, v, 0)
    assert state(layer) == ([0, 3], [F(41, 24), F(1, 2)])


def test_h2o_oracle_sums_over_the_query_group():
    """Two query heads (q = +1, -1) share one KV head: keys weighted 1, 2 give head + the
    probabilities [1/3, 2/3] and head - [2/3, 1/3] at t=1; scores 1+1+1/3+2/3 = 3 and 1."""
    layer = hand_layer("h2o", budget=4, recent=1)
    feed_hand(layer, [1, 2], signs=(1.0, -1.0))
    assert state(layer) == ([0, 1], [F(3), F(1)])


def test_h2o_oracle_never_evicts_sinks():
    """sink 1, heavy 1, recent 1, all keys alike: at t=3 the scores are [25/12, 13/12, 7/12,
    1/4]; token 0 (a sink) and 3 (recent) stay, 2 (7/12 < 13/12) goes. Keys weighted 1,
    100, 100 and a budget of 2: at t=2 the scores are [1 + 1/101 + 1/201, 100/101 +
    100/201, 100/201]; plain H2O (heavy 1, recent 1) evicts token 0, with it as a sink
    (heavy 0) token 1 goes instead."""
    layer = hand_layer("h2o", budget=3, sink=1, recent=1)
    feed_hand(layer, [1, 1, 1, 1])
    assert state(layer) == ([0, 1, 3], [F(25, 12), F(13, 12), F(1, 4)])
    plain, with_sink = hand_layer("h2o", budget=2, recent=1), hand_layer("h2o", budget=2,
                                                                         sink=1, recent=1)
    for layer in (plain, with_sink):
        feed_hand(layer, [1, 100, 100])
    assert plain.pos[0].tolist() == [1, 2] and with_sink.pos[0].tolist() == [0, 2]


def test_tova_oracle_by_hand():
    """budget 2, keys 1, 3, 2: at t=2 p = [1/6, 1/2, 1/3], token 0 goes; t=3 (key 1) over
    {1, 2, 3}: p = [1/2, 1/3, 1/6]: the new token itself goes (TOVA keeps no recent)."""
    layer = hand_layer("tova", budget=2)
    feed_hand(layer, [1, 3, 2])
    assert state(layer) == ([1, 2], [F(1, 2), F(1, 3)])
    feed_hand_at(layer, 1, t=3)
    assert state(layer) == ([1, 2], [F(1, 2), F(1, 3)])


def test_tova_oracle_averages_heads_and_breaks_ties_oldest():
    """Heads q = +1, -1, keys 1, 3, 2: head - gives [6/11, 2/11, 3/11]; the mean with
    [1/6, 1/2, 1/3] is [47/132, 45/132, 40/132]: token 2 goes. Equal keys: uniform
    probabilities, every score tied: the oldest goes (0, then 1)."""
    layer = hand_layer("tova", budget=2)
    feed_hand(layer, [1, 3, 2], signs=(1.0, -1.0))
    assert state(layer) == ([0, 1], [F(47, 132), F(45, 132)])
    layer = hand_layer("tova", budget=2)
    feed_hand(layer, [1, 1, 1])
    assert state(layer)[0] == [1, 2]
    feed_hand_at(layer, 1, t=3)
    assert state(layer)[0] == [2, 3]


# ----------------------------------------------------------- oracles against known policies
@pytest.mark.parametrize("mode", ["cache", "absolute"])
@pytest.mark.parametrize("family", FAMILIES)
def test_h2o_without_heavy_is_streaming_llm(tiny_models, family, mode):
    """heavy = 0 leaves sinks + the recent window: StreamingLLM (its oracle re-rotates the
    cache each step, as H2O's position rolling does), in both position modes; with a budget
    larger than the stream, H2O and TOVA are dense attention."""
    model = tiny_models[family].model
    tokens = tokens_for(3, 24)
    ours = h2o_logits(model, tokens, heavy=0, recent=5, sink=2, position_mode=mode).logits
    theirs = streaming_logits(model, tokens, sink=2, window=5, position_mode=mode)
    assert rel_err(ours, theirs) < TOL
    dense = dense_logits(model, tokens)
    for run in (h2o_logits(model, tokens, heavy=20, recent=4, position_mode=mode,
                           chunks=[5, 1, 18]),
                tova_logits(model, tokens, budget=24, position_mode=mode, chunks=[9, 15])):
        assert rel_err(run.logits, dense) < TOL
    # and eviction matters: a real H2O budget is far from both
    h2o = h2o_logits(model, tokens, heavy=3, recent=2, sink=2, position_mode=mode).logits
    assert rel_err(h2o, theirs) > 100 * TOL and rel_err(h2o, dense) > 100 * TOL


# ------------------------------------------------------------------------ fast == oracle
@st.composite
def scored_cases(draw, policy: str, max_tokens: int = 22):
    mode = draw(st.sampled_from(("cache", "absolute")))
    sink = draw(st.integers(0, 3))
    if policy == "h2o":
        heavy = draw(st.integers(0, 4))
        recent = draw(st.integers(0 if heavy else 1, 4))
        cfg = H2OConfig(heavy=heavy, recent=recent, sink=sink, position_mode=mode)
    else:
        cfg = TOVAConfig(budget=draw(st.integers(sink + 1, sink + 5)), sink=sink,
                         position_mode=mode)
    low = 1 if draw(st.booleans()) else min(cfg.budget + 2, max_tokens)
    return cfg, draw(st.integers(low, max_tokens))


OFFSETS = st.one_of(st.just(0), st.integers(1, 10**7))


@pytest.mark.parametrize("policy", ["h2o", "tova"])
@settings(max_examples=max(10, settings.default.max_examples * 3 // 4))
@given(family=st.sampled_from(FAMILIES), offset=OFFSETS, seed=st.integers(0, 2**16),
       data=st.data())
def test_fast_cache_equals_oracle(tiny_models, policy, family, offset, seed, data):
    """Any mix of chunked prefill and decode steps through the fast cache gives the oracle's
    logits fed the same chunks, for random budgets, sinks, streams and both position modes;
    after every chunk and step the device buffers hold the oracle's tokens with its
    scores (check_state), and the stored keys are the tokens' own (layer 0)."""
    cfg, n = data.draw(scored_cases(policy), label="case")
    schedule = data.draw(schedules(n), label="schedule")
    model = tiny_models[family].model
    tokens = tokens_for(seed, n)
    per_op = chunks_of(schedule)
    run = reference(model, tokens, cfg, chunks=[c for op in per_op for c in op],
                    offset=offset)
    cache = make_cache(cfg, model.spec, model.dtype, model.device, position_offset=offset)
    dec = Decoder(model, cache)
    G = model.spec.num_heads // model.spec.num_kv_heads
    k_ref = layer0_keys(model, tokens, offset)
    parts, done = [], 0
    for (t, out), op in zip(feed(dec, tokens, schedule), per_op):
        done += len(op)
        parts.append(out)
        check_state(cache, run.states[done - 1], cfg, t, G)
        for h, row in enumerate(cache.pos[0].tolist()):
            for s, j in enumerate(row):
                if j >= 0:
                    torch.testing.assert_close(cache.k[0, h, s], k_ref[h, j], rtol=1e-5,
                                               atol=1e-5)
    logits = torch.cat(parts)
    assert torch.isfinite(logits).all()
    assert rel_err(logits, run.logits) < TOL, (cfg, schedule)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_tolerance_is_discriminating(tiny_models, family):
    """A position error is far outside TOL: the oracle's cache-mode H2O against the fast
    cache run with absolute positions (same budgets)."""
    model = tiny_models[family].model
    tokens = tokens_for(5, 20)
    cfg = H2OConfig(heavy=3, recent=2, sink=1, position_mode="cache")
    ref = reference(model, tokens, cfg).logits
    wrong = Decoder.build(model, H2OConfig(heavy=3, recent=2, sink=1))
    out = torch.stack([wrong.step(int(x)) for x in tokens])
    assert rel_err(out, ref) > 1000 * TOL


# ---------------------------------------------------------------- int8 storage, dtypes
CONFIGS = [H2OConfig(heavy=3, recent=2, sink=1), H2OConfig(heavy=2, recent=3, sink=0,
                                                           position_mode="cache"),
           TOVAConfig(budget=5, sink=1), TOVAConfig(budget=4, position_mode="cache")]


def cfg_id(cfg) -> str:
    return f"{cfg.policy}-{cfg.position_mode}-{cfg.kv_dtype}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_storage_equals_oracle_on_int8(tiny_models, family, cfg):
    """int8 KV storage (per-head, per-token scales, written per KV head at its own slot)
    gives the oracle fed the same int8-rounded keys and values, held tokens included; and
    it differs from the float cache by more than that tolerance (the rounding is seen)."""
    from dataclasses import replace

    model = tiny_models[family].model
    tokens = tokens_for(11, 26)
    chunks = [6, 1, 1, 4, 1, 1, 9, 1, 1, 1]
    q8 = replace(cfg, kv_dtype="int8")
    run = reference(model, tokens, cfg, chunks=chunks, kv_int8=True)
    dec = Decoder(model, make_cache(q8, model.spec))
    parts = []
    for c in chunks:
        dec.chunk_size = c
        parts.append(dec.prefill(tokens[dec.t:dec.t + c], all_logits=True))
    assert dec.cache.k.dtype == torch.int8
    assert rel_err(torch.cat(parts), run.logits) < 1e-4
    for layer, ref in enumerate(run.layers):
        assert dec.cache.held_by_head()[layer] == ref.pos.tolist()
    fp = reference(model, tokens, cfg, chunks=chunks).logits
    assert rel_err(run.logits, fp) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_long_streams_are_finite(tiny_model_factory, family, dtype):
    """Streams of 100 tokens (chunks, then decode steps) through small H2O and TOVA caches,
    in both position modes and int8, give finite logits and finite scores in bf16 and fp16
    (fp32: the parity tests), the caches full to their budget."""
    lm = tiny_model_factory(family, dtype)
    tokens = tokens_for(7, 100)
    configs = [H2OConfig(heavy=4, recent=3, sink=2), H2OConfig(heavy=3, recent=1,
                                                               position_mode="cache"),
               TOVAConfig(budget=6, sink=1, kv_dtype="int8"),
               TOVAConfig(budget=5, position_mode="cache")]
    for cfg in configs:
        dec = Decoder.build(lm.model, cfg, chunk_size=23)
        out = torch.cat([dec.prefill(tokens[:75], all_logits=True),
                         torch.stack([dec.step(int(x)) for x in tokens[75:]])])
        assert out.shape == (100, VOCAB) and torch.isfinite(out).all(), (cfg, dtype)
        c = dec.cache
        assert torch.isfinite(c.score).all()
        assert ((c.pos >= 0).sum(-1) == cfg.budget).all()


# --------------------------------------------------------------- static, sync-free decode
@pytest.mark.parametrize("cfg", CONFIGS[:2] + [TOVAConfig(budget=4, kv_dtype="int8",
                                                          position_mode="cache")],
                         ids=cfg_id)
def test_decode_step_is_static_and_sync_free(tiny_llama, cfg, monkeypatch):
    """A decode step reads no device value on the host (item/bool/int/tolist/nonzero
    would raise) and keeps every buffer where and as large as it was, so it can be
    captured as a CUDA graph; eviction happens in it (the cache is full)."""
    dec = Decoder.build(tiny_llama.model, cfg)
    dec.prefill(tokens_for(2, 12))
    c = dec.cache
    bufs = [c.pos, c.score, c.newer, c.free, *vars(c.storage).values()]
    before = [(b.data_ptr(), b.shape) for b in bufs if isinstance(b, torch.Tensor)]
    held = c.held_by_head()

    def host_read(*a, **k):
        raise AssertionError("the decode step read a device value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for t in range(12, 16):
        dec.tok_buf.fill_(t % VOCAB)
        dec.pos_buf.fill_(t)
        dec.eager_step(dec.tok_buf, dec.pos_buf)
    monkeypatch.undo()
    after = [(b.data_ptr(), b.shape) for b in bufs if isinstance(b, torch.Tensor)]
    assert after == before
    assert c.held_by_head() != held  # tokens were evicted and written


# ------------------------------------------------------------------- config, engine hooks
@pytest.mark.parametrize("make", [
    lambda: H2OConfig(heavy=-1), lambda: H2OConfig(recent=-2), lambda: H2OConfig(sink=-1),
    lambda: H2OConfig(heavy=0, recent=0), lambda: H2OConfig(heavy=1.5),
    lambda: H2OConfig(heavy=True), lambda: H2OConfig(position_mode="text"),
    lambda: H2OConfig(kv_dtype="int4"), lambda: TOVAConfig(budget=0),
    lambda: TOVAConfig(budget=4, sink=4), lambda: TOVAConfig(budget="8"),
    lambda: TOVAConfig(position_mode="rolling")])
def test_bad_budgets_get_clear_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_configs_and_registration(tiny_llama):
    cfg = H2OConfig(heavy=5, recent=3, sink=2)
    assert cfg.budget == 10 and cfg.to_dict()["policy"] == "h2o"
    assert TOVAConfig(budget=7).to_dict() == {"policy": "tova", "budget": 7, "sink": 0,
                                              "position_mode": "absolute", "kv_dtype": "auto"}
    cache = make_cache(cfg, tiny_llama.spec)
    assert cache.name == "h2o" and cache.slots == 11 and cache.max_held() == 10
    assert cache.k.shape == (tiny_llama.spec.num_layers, tiny_llama.spec.num_kv_heads, 11,
                             tiny_llama.spec.head_dim)
    assert cache.bytes_per_token_read() > cache.storage.nbytes()
    with pytest.raises(InputError):
        cache.held_positions(3)  # per head: held_by_head()


def test_reset_forgets(tiny_neox):
    """Decoder.reset clears the score cache (the same stream gives the same logits again)."""
    dec = Decoder.build(tiny_neox.model, H2OConfig(heavy=2, recent=2, position_mode="cache"))
    tokens = tokens_for(4, 14)
    first = torch.cat([dec.prefill(tokens[:6], all_logits=True),
                       torch.stack([dec.step(int(x)) for x in tokens[6:]])])
    dec.reset()
    again = torch.cat([dec.prefill(tokens[:6], all_logits=True),
                       torch.stack([dec.step(int(x)) for x in tokens[6:]])])
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_compiled_eager_step_equals_eager(tiny_llama):
    """torch.compile of the eager step (``--compile default``, inductor: the CPU's compiled
    path; the fused step's: test_fused_scored) takes a score cache whole (fullgraph, static
    shapes): the same logits and buffers as eager, step by step, past the budget, for the
    most involved case (GQA, position rolling, int8 KV)."""
    cfg = H2OConfig(heavy=3, recent=2, sink=1, position_mode="cache", kv_dtype="int8")
    tokens = tokens_for(6, 16)
    ref, dec = Decoder.build(tiny_llama.model, cfg), Decoder.build(tiny_llama.model, cfg)
    ref.prefill(tokens[:9])
    dec.prefill(tokens[:9])
    step = compile_decoder(dec, "default")
    assert step.kernels == "inductor"
    for x in tokens[9:]:
        a, b = ref.step(int(x)), dec.step(int(x))
        assert rel_err(b, a) < TOL
        for name in ("pos", "free", "newer"):
            assert torch.equal(getattr(ref.cache, name), getattr(dec.cache, name)), name
        torch.testing.assert_close(dec.cache.score, ref.cache.score, rtol=1e-5, atol=1e-6)


def test_attend_per_head_mask_and_observe():
    """attend's hooks: a per-KV-head mask [Hkv, T, N] hides keys per head, and observe
    gets the probabilities [Hkv, G, T, N] (rows summing to 1, zero where masked)."""
    from fastdecode.cache.base import Plan
    from fastdecode.cache.storage import KV

    gen = torch.Generator().manual_seed(0)
    Hkv, G, T, N, D = 2, 3, 2, 5, 4
    q = torch.randn(Hkv * G, T, D, generator=gen)
    k, v = torch.randn(Hkv, N, D, generator=gen), torch.randn(Hkv, N, D, generator=gen)
    mask = torch.rand(Hkv, T, N, generator=gen) < 0.6
    mask[..., 0] = True
    seen = []
    plan = Plan(q_pos=torch.zeros(T, dtype=torch.long), q_pos_sink=None, mask=None,
                key_is_sink=None)
    out = attend(q, None, KV(k, v, mask=mask, observe=seen.append), plan, 0)
    (probs,) = seen
    assert probs.shape == (Hkv, G, T, N)
    torch.testing.assert_close(probs.sum(-1), torch.ones(Hkv, G, T))
    assert (probs[~mask[:, None].expand_as(probs)] == 0).all()
    for h in range(Hkv):
        p = torch.softmax((q[h * G:(h + 1) * G] @ k[h].T / 2).masked_fill(~mask[h], -math.inf),
                          -1)
        torch.testing.assert_close(out[h * G:(h + 1) * G], p @ v[h])
