"""Property tests of the KV cache policies against the paper's reference and a list model.

Oracles:
- ``reference.streaming.streaming_logits``: the StreamingLLM code's way (keys cached before
  RoPE, evicted by slicing, the whole cache re-rotated every step), one token at a time;
- ``simulate_held``: the paper's eviction rule on a Python list;
- layer-0 keys/values recomputed from the embedding (they depend on no context).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.cache import POLICIES, CacheConfig, PolicyConfig, make_cache
from fastdecode.engine import Decoder, sample
from fastdecode.reference.streaming import _rotate, streaming_logits

FAMILIES = ("tiny-neox", "tiny-llama")
# The policies whose reference is the StreamingLLM oracle (sinks + window, or nothing
# evicted); each other policy brings its own oracle and tests.
SINK_WINDOW = ("dense", "window", "streaming")
assert set(SINK_WINDOW) <= set(POLICIES)
VOCAB = 97  # both tiny presets
TOL = 1e-5  # fp32, relative: the fast path and the reference differ only by rounding


# ------------------------------------------------------------------------------ helpers
def rel_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(‖a−b‖/‖b‖, max|a−b| / max|b|) in float64."""
    a, b = a.double(), b.double()
    return (float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max()))


def assert_rel_close(a, b, tol=TOL, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    norm_err, max_err = rel_errors(a, b)
    assert norm_err <= tol and max_err <= tol, (
        f"{what}: relative error {norm_err:.3g} (norm), {max_err:.3g} (max) > {tol}")


def simulate_held(S: int, W: int | None, R: int, t: int) -> list[int]:
    """The paper's rule on a list: append each token; once S + W + R are held, keep the
    first S and the last W. ``W=None``: never evict (dense)."""
    held: list[int] = []
    for j in range(t):
        held.append(j)
        if W is not None and len(held) >= S + W + R:
            held = held[:S] + held[-W:]
    return held


def cache_config(policy: str, mode: str, **candidates) -> PolicyConfig:
    """The policy's config from those of ``candidates`` (sink, window, compress_every,
    max_len) that it has."""
    own = POLICIES[policy].options()
    return CacheConfig(policy=policy, position_mode=mode,
                       **{k: v for k, v in candidates.items() if k in own})


def oracle_params(cfg: PolicyConfig) -> tuple[int, int | None, int]:
    """(S, W, R) of the reference for a config, from its facts; W=None: nothing is
    evicted (a cache that takes at most max_tokens)."""
    if cfg.max_tokens is not None:
        return cfg.sink, None, 1
    return cfg.sink, cfg.budget - cfg.sink, cfg.compress_every


def tokens_for(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def feed(dec: Decoder, tokens: torch.Tensor, schedule: list[tuple[str, int, int]]):
    """Feed ``tokens`` by ``schedule`` ([("prefill", n, chunk) | ("step", n, 0)]), yielding
    (t after the op, logits of the op's tokens [n, V])."""
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


def layer0_kv(model, tokens: torch.Tensor, offset: int):
    """Layer-0 keys (rotated at text position + offset, float64 angles) and values for
    every token, [Hkv, N, D]: what each cache slot holding that token must contain."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    with torch.no_grad():
        layer = model.layers[0]
        qkv = layer.attn.qkv(layer.norm1(model.embed(tokens)))
        qkv = qkv.view(len(tokens), H + 2 * Hkv, D).transpose(0, 1)
        k, v = qkv[H:H + Hkv], qkv[H + Hkv:]
        pos = torch.arange(len(tokens)) + offset
        return _rotate(k, pos, spec.rotary_dim, spec.rope_theta), v


# ---------------------------------------------------------------------------- strategies
@st.composite
def cache_cases(draw, policy: str, mode: str | None = None, max_tokens: int = 40):
    """(CacheConfig, stream length) for ``policy``; the stream is often long enough to
    evict several times (hypothesis alone favours short ones)."""
    sink = draw(st.integers(0, 4)) if "sink" in POLICIES[policy].options() else 0
    window = draw(st.integers(1, 8))
    compress_every = draw(st.integers(1, 5))
    if draw(st.booleans()):
        n = draw(st.integers(1, max_tokens))
    else:
        n = draw(st.integers(min(sink + window + compress_every, max_tokens), max_tokens))
    cfg = cache_config(
        policy, mode=mode or draw(st.sampled_from(("cache", "absolute"))), sink=sink,
        window=window, compress_every=compress_every,
        max_len=n + draw(st.integers(0, 3)),  # dense: sometimes exactly full
    )
    return cfg, n


@st.composite
def schedules(draw, n: int):
    """Split n tokens into prefill chunks (random chunk sizes) and runs of decode steps."""
    out, left = [], n
    while left:
        size = draw(st.integers(1, left))
        if draw(st.booleans()):
            out.append(("prefill", size, draw(st.integers(1, size))))
        else:
            out.append(("step", size, 0))
        left -= size
    return out


OFFSETS = st.one_of(st.just(0), st.just(10**7), st.integers(1, 10**7))


# ------------------------------------------------------------- RoPE position consistency
POLICY_MODES = [("dense", "cache"), ("window", "cache"), ("window", "absolute"),
                ("streaming", "cache"), ("streaming", "absolute")]


@pytest.mark.parametrize(("policy", "mode"), POLICY_MODES)
@settings(max_examples=2 * settings.default.max_examples)
@given(family=st.sampled_from(FAMILIES), offset=OFFSETS, seed=st.integers(0, 2**16),
       data=st.data())
def test_fast_cache_equals_streaming_reference(tiny_models, policy, mode, family, offset,
                                               seed, data):
    """Prefill (chunked, all logits) and decode steps through the fast cache, in any
    order and split, give the reference's logits, for every policy, position mode and a
    stream starting at up to 10^7 (angles computed in float64)."""
    cfg, n = data.draw(cache_cases(policy, mode), label="case")
    model = tiny_models[family].model
    schedule = data.draw(schedules(n), label="schedule")
    tokens = tokens_for(seed, n)
    S, W, R = oracle_params(cfg)
    ref = streaming_logits(model, tokens, sink=S, window=W, compress_every=R,
                           position_mode=cfg.position_mode, position_offset=offset)
    cache = make_cache(cfg, model.spec, model.dtype, model.device, position_offset=offset)
    dec = Decoder(model, cache)
    parts = [out for _, out in feed(dec, tokens, schedule)]
    assert dec.t == n
    assert_rel_close(torch.cat(parts), ref,
                     what=f"{family} {cfg} offset={offset} schedule={schedule}")


@pytest.mark.parametrize("family", FAMILIES)
def test_tolerance_is_discriminating(tiny_models, family):
    """The parity tolerance is far below what a position error costs: the reference in
    cache and in absolute positions (same tokens kept, sinks scored at different
    positions) differ by orders of magnitude more than TOL, and so does a fast cache
    whose sink positions are off by one."""
    model = tiny_models[family].model
    tokens = tokens_for(1, 30)
    kw = dict(sink=2, window=5, compress_every=1)
    cache_mode = streaming_logits(model, tokens, position_mode="cache", **kw)
    absolute = streaming_logits(model, tokens, position_mode="absolute", **kw)
    assert rel_errors(absolute, cache_mode)[0] > 1000 * TOL

    cache = make_cache(CacheConfig(policy="streaming", **kw), model.spec)
    bounds = cache._query_bounds
    cache._query_bounds = lambda ti: (lambda lo, ps: (lo, ps + 1))(*bounds(ti))
    wrong = Decoder(model, cache).prefill(tokens, all_logits=True)
    assert rel_errors(wrong, cache_mode)[0] > 1000 * TOL


# ------------------------------------------------------------------------ cache invariants
@pytest.mark.parametrize("policy", SINK_WINDOW)
@settings(max_examples=8 * settings.default.max_examples)
@given(data=st.data())
def test_held_positions_follow_the_paper_rule(policy, data):
    """held_positions(t) is the paper's list simulation for every t, and its shape
    invariants hold: bounded by max_held (S+W, or S+W+R-1 lazily), sinks never evicted,
    increasing, window contiguous and ending at t-1."""
    from fastdecode.models.presets import SHAPE_PRESETS

    cfg, n = data.draw(cache_cases(policy, max_tokens=80), label="case")
    cache = make_cache(cfg, SHAPE_PRESETS["tiny-llama"]())
    S, W, R = oracle_params(cfg)
    bound = cfg.max_tokens if W is None else S + W + R - 1
    assert cache.max_held() == cfg.max_held == bound
    if W is not None and R == 1:
        assert bound == S + W
    for t in range(n + 1):
        held = cache.held_positions(t)
        assert held == simulate_held(S, W, R, t), t
        assert len(held) <= cache.max_held()
        assert held[:min(t, S)] == list(range(min(t, S)))  # sinks, once seen, stay
        assert held == sorted(set(held))
        window = held[min(t, S):]
        if t > S:
            assert window and window[-1] == t - 1
            assert window == list(range(window[0], t))


@pytest.mark.parametrize("policy", SINK_WINDOW)
@settings(max_examples=2 * settings.default.max_examples)
@given(family=st.sampled_from(FAMILIES), offset=OFFSETS, seed=st.integers(0, 2**16),
       data=st.data())
def test_buffers_hold_exactly_what_is_visible(tiny_models, policy, family, offset, seed, data):
    """After any mix of chunked prefill and decode steps, the device buffers agree with
    the policy: every slot the cache believes holds token j holds j's layer-0 key (rotated
    at j + offset) and value; every held token is in some slot; and the next query (one
    decode step, or each row of a prefill chunk) sees exactly the held tokens plus
    itself: no stale or empty slot is ever visible, no token twice."""
    cfg, n = data.draw(cache_cases(policy), label="case")
    model = tiny_models[family].model
    S, W, R = oracle_params(cfg)
    tokens = tokens_for(seed, n + 8)
    k_ref, v_ref = layer0_kv(model, tokens, offset)
    cache = make_cache(cfg, model.spec, model.dtype, model.device, position_offset=offset)
    dec = Decoder(model, cache)
    room = cfg.max_tokens
    for t, _ in feed(dec, tokens[:n], data.draw(schedules(n), label="schedule")):
        held = simulate_held(S, W, R, t)
        assert cache.held_positions(t) == held
        slot_tok = cache._slot_tokens(t - 1)
        assert slot_tok.shape == (cache.slots,)
        assert set(held) <= set(slot_tok.tolist()), "a held token is in no slot"
        for s, j in enumerate(slot_tok.tolist()):
            if j < 0:
                continue
            assert 0 <= j < t
            torch.testing.assert_close(cache.k[0, :, s], k_ref[:, j], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, s=s, j=j: f"key of token {j} in slot {s}: {m}")
            torch.testing.assert_close(cache.v[0, :, s], v_ref[:, j], rtol=1e-5, atol=1e-6)

        if room is not None and t >= room:
            continue  # a full dense cache takes no more tokens
        # The next decode step: it writes token t first, then reads every slot.
        plan = cache.plan_decode(torch.tensor([t]))
        keys_j = cache._slot_tokens(t)
        assert int(plan.decode_slot) == cache.slot_of(t)
        seen = sorted(keys_j[plan.mask[0]].tolist())
        assert seen == held + [t]
        # A prefill chunk instead: row i sees what is held after t + i tokens, plus itself.
        T = data.draw(st.integers(1, 6 if room is None else min(6, room - t)), label="T")
        plan = cache.plan_prefill(t, T)
        keys_j = torch.cat((cache._slot_tokens(t - 1), torch.arange(t, t + T)))
        for i in range(T):
            seen = sorted(keys_j[plan.mask[i]].tolist())
            assert seen == simulate_held(S, W, R, t + i) + [t + i], (t, i)


def test_dense_held_positions_when_full(tiny_llama):
    """A dense cache never evicts: when exactly full it holds every token (and can say
    nothing about more tokens than it can hold)."""
    from fastdecode.errors import InputError

    cache = make_cache(CacheConfig(policy="dense", max_len=5), tiny_llama.spec)
    assert cache.held_positions(5) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError):
        cache.held_positions(6)


# ------------------------------------------------------------------ long streams, dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_long_streams_are_finite(tiny_model_factory, family, dtype):
    """Streams of several hundred tokens through small caches (the ring wraps ~100 times)
    give finite logits in every dtype and policy, close to the float32 model's."""
    n, n_steps = 480, 60  # most of it in chunks, the tail as decode steps
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (n,), generator=gen)
    chunks = torch.randint(1, 40, (64,), generator=gen).tolist()
    configs = [CacheConfig(policy="dense", max_len=n),
               CacheConfig(policy="window", sink=0, window=3, compress_every=2),
               CacheConfig(policy="streaming", sink=4, window=4, compress_every=1),
               CacheConfig(policy="streaming", sink=2, window=3, compress_every=4),
               CacheConfig(policy="streaming", sink=1, window=2, compress_every=3,
                           position_mode="absolute")]
    lm = tiny_model_factory(family, dtype)
    base = tiny_model_factory(family, torch.float32)
    for cfg in configs:
        outs = {}
        for name, m in (("low", lm), ("fp32", base)):
            if name == "fp32" and dtype == torch.float32:
                break
            dec = Decoder.build(m.model, cfg)
            parts, pos = [], 0
            for c in chunks:
                if pos >= n - n_steps:
                    break
                dec.chunk_size = c
                parts.append(dec.prefill(tokens[pos:min(pos + c, n - n_steps)],
                                         all_logits=True))
                pos = dec.t
            parts += [dec.step(int(x))[None] for x in tokens[pos:]]
            outs[name] = torch.cat(parts).float()
        assert outs["low"].shape == (n, VOCAB)
        assert torch.isfinite(outs["low"]).all(), f"{cfg}: non-finite logits in {dtype}"
        if "fp32" in outs:
            assert rel_errors(outs["low"], outs["fp32"])[0] < 0.1, cfg


# ---------------------------------------------------------- chunked prefill == one by one
@pytest.mark.parametrize("policy", SINK_WINDOW)
@given(family=st.sampled_from(FAMILIES), offset=OFFSETS, seed=st.integers(0, 2**16),
       chunk=st.integers(1, 16), data=st.data())
def test_chunked_prefill_equals_token_by_token(tiny_models, policy, family, offset, seed,
                                               chunk, data):
    """Prefill in chunks of any size leaves the same logits and the same cache (every
    slot in use, every layer, keys and values) as feeding the tokens one at a time."""
    cfg, n = data.draw(cache_cases(policy), label="case")
    model = tiny_models[family].model
    tokens = tokens_for(seed, n)
    decs = [Decoder(model, make_cache(cfg, model.spec, position_offset=offset),
                    chunk_size=chunk) for _ in range(2)]
    chunked = decs[0].prefill(tokens, all_logits=True)
    one_by_one = torch.stack([decs[1].step(int(x)) for x in tokens])
    assert_rel_close(chunked, one_by_one, what=f"{cfg} chunk={chunk}")
    a, b = (d.cache for d in decs)
    used = a._slot_tokens(n - 1) >= 0
    assert torch.equal(used, b._slot_tokens(n - 1) >= 0)
    for x, y in ((a.k, b.k), (a.v, b.v)):
        torch.testing.assert_close(x[:, :, used], y[:, :, used], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- sampling
@given(seed=st.integers(0, 2**16), n=st.integers(2, 300), scale=st.floats(0.1, 30))
def test_sample(seed, n, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=gen) * scale
    best = int(logits.argmax())
    greedy = sample(logits)
    assert greedy.shape == (1,) and greedy.dtype == torch.long and int(greedy) == best
    for temperature in (0.5, 1.0, 3.0):
        assert int(sample(logits, temperature, top_k=1,
                          generator=torch.Generator().manual_seed(seed))) == best
        assert int(sample(logits, temperature, top_p=1e-9,
                          generator=torch.Generator().manual_seed(seed))) == best
    draws = [[int(sample(logits, 1.0, top_k=k, top_p=p, generator=g)) for _ in range(20)]
             for k, p in ((None, None), (5, None), (None, 0.9), (3, 0.5))
             for g in (torch.Generator().manual_seed(seed),)]
    again = [[int(sample(logits, 1.0, top_k=k, top_p=p, generator=g)) for _ in range(20)]
             for k, p in ((None, None), (5, None), (None, 0.9), (3, 0.5))
             for g in (torch.Generator().manual_seed(seed),)]
    assert draws == again  # seeded sampling is reproducible
    top5 = set(torch.topk(logits, min(5, n)).indices.tolist())
    assert set(draws[1]) <= top5  # top_k keeps only the k best


def test_sampling_follows_the_distribution():
    """Sampling at temperature 1 draws from softmax(logits): a frequency check."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample(logits, 1.0, generator=gen)
                                       for _ in range(4000)]), minlength=4).double()
    torch.testing.assert_close(counts / counts.sum(), torch.softmax(logits.double(), 0),
                               atol=0.03, rtol=0)
