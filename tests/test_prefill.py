"""The flash prefill attention (fastdecode.kernels.flash_prefill) equals the reference
``attention.attend``: kernel by kernel on random policies and shapes, and whole-model
through ``Decoder.prefill`` and the parallel perplexity evaluator; plus the prefill's
chunking and its head on the asked-for rows only.

On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel is defined) and only where a test asks for it (``prefill_kernel="flash"``, or
``attend(..., flash=True)``): everywhere else the CPU suite takes the reference. The
``flash_calls`` fixture counts the kernel's calls, and every test here checks it. On CUDA
(gpu marker) the compiled kernel in bf16.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # where the tests that run on both put their tensors
# Tests that run the kernel on CPU tensors under the interpreter; on a CUDA machine the
# interpreter is off (the GPU tests below run the kernel itself).
on_interpreter = pytest.mark.skipif(CUDA, reason="runs the kernel under Triton's interpreter "
                                    "on CPU tensors; CUDA runs test_flash_kernel_on_cuda_bf16")
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")
pytest.importorskip("triton")

from fastdecode import attention as A  # noqa: E402
from fastdecode import rope  # noqa: E402
from fastdecode.cache import CacheConfig, make_cache  # noqa: E402
from fastdecode.engine import FLASH_CHUNK, REFERENCE_CHUNK, Decoder  # noqa: E402
from fastdecode.errors import ConfigError, DeviceError  # noqa: E402
from fastdecode.eval.ppl import EvalSpec, evaluate  # noqa: E402
from fastdecode.kernels import flash_prefill as FP  # noqa: E402
from fastdecode.kernels import prefill_norm as PN  # noqa: E402
from fastdecode.kernels.flash_prefill import block_table, head_split  # noqa: E402
from fastdecode.kernels.prefill_norm import dual_layer_norm  # noqa: E402
from fastdecode.kernels.prefill_rope import prefill_rope  # noqa: E402

FAMILIES = ("tiny-neox", "tiny-llama")
# (query heads, kv heads, head dim): GPT-NeoX 2.8B's 80 (64 + 16), Llama GQA at 64, and the
# tiny presets' 8 (padded to 16).
SHAPES = [(4, 4, 80), (4, 2, 64), (2, 1, 8)]


class _Spec:  # what make_cache needs
    num_layers = 1

    def __init__(self, kv_heads, head_dim):
        self.num_kv_heads, self.head_dim = kv_heads, head_dim


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@st.composite
def cache_configs(draw, max_slots: int = 28):
    policy = draw(st.sampled_from(["dense", "window", "streaming"]))
    kv = draw(st.sampled_from(["auto", "int8"]))
    mode = draw(st.sampled_from(["cache", "absolute"]))
    if policy == "dense":
        return CacheConfig(policy="dense", max_len=draw(st.integers(4, max_slots)),
                           position_mode=mode, kv_dtype=kv)
    S = draw(st.integers(1, 4)) if policy == "streaming" else 0
    R = draw(st.integers(1, 6))
    W = draw(st.integers(1, max_slots - S - R))
    return CacheConfig(policy=policy, sink=S, window=W, compress_every=R, position_mode=mode,
                       kv_dtype=kv)


def _filled_cache(cfg, kv_heads, head_dim, gen, device="cpu", dtype=torch.float32):
    """A cache whose every slot holds random data (stale slots too: they must stay unseen)."""
    c = make_cache(cfg, _Spec(kv_heads, head_dim), dtype, device)
    st_ = c.storage
    for buf in (st_.k, st_.v):
        if buf.dtype == torch.int8:
            buf.copy_(torch.randint(-127, 128, buf.shape, generator=gen, dtype=torch.int8))
        else:
            buf.copy_(3 * torch.randn(buf.shape, generator=gen))
    if cfg.kv_dtype == "int8":
        for s in (st_.k_scale, st_.v_scale):
            s.copy_(0.01 + 0.04 * torch.rand(s.shape, generator=gen))
    return c


class _Counter:
    """Counts the flash kernel's calls (attention.attend imports it at each call)."""

    def __init__(self):
        self.n, self._fn = 0, FP.flash_prefill

    def __call__(self, *a, **kw):
        self.n += 1
        return self._fn(*a, **kw)


@pytest.fixture
def flash_calls(monkeypatch):
    counter = _Counter()
    monkeypatch.setattr(FP, "flash_prefill", counter)
    return counter


def _both(q, q_sink, kv, plan, S, calls):
    before, built = calls.n, plan._mask is not None
    out = A.attend(q, q_sink, kv, plan, S, flash=True)
    assert calls.n == before + 1, "the flash kernel did not run"
    assert built or plan._mask is None, "the flash path built the dense mask"
    ref = A.attend(q, q_sink, kv, plan, S)
    assert calls.n == before + 1, "the reference ran the flash kernel"
    return out, ref


# ------------------------------------------------------------------ the kernel alone
@on_interpreter
@settings(max_examples=12)
@given(cfg=cache_configs(), shape=st.sampled_from(SHAPES), t0=st.integers(0, 80),
       T=st.integers(2, 36), seed=st.integers(0, 2**16))
def test_flash_kernel_equals_reference_attention(flash_calls, cfg, shape, t0, T, seed):
    """Random policy (dense, window, streaming strict/lazy, both position modes, int8 KV),
    position, chunk length and head layout: the same output as ``attend``."""
    Hq, Hkv, D = shape
    if cfg.policy == "dense":
        t0 = t0 % (cfg.max_len + 1)
        T = max(1, min(T, cfg.max_len - t0))
        if T < 2:
            t0, T = 0, cfg.max_len
    gen = torch.Generator().manual_seed(seed)
    c = _filled_cache(cfg, Hkv, D, gen)
    plan = c.plan_prefill(t0, T)
    q = 2 * torch.randn(Hq, T, D, generator=gen)
    q_sink = 2 * torch.randn(Hq, T, D, generator=gen) if c.sink else None
    kv = c.update(0, torch.randn(Hkv, T, D, generator=gen), torch.randn(Hkv, T, D, generator=gen),
                  plan)
    out, ref = _both(q, q_sink, kv, plan, c.sink, flash_calls)
    assert out.shape == ref.shape == (Hq, T, D)
    assert _rel(out, ref) < 1e-5, (cfg, shape, t0, T)


@on_interpreter
def test_the_kernel_check_is_discriminating(flash_calls):
    """A wrong sink query, or one key made visible that should not be, shows far above
    the tolerance the property test uses."""
    cfg = CacheConfig(policy="streaming", sink=2, window=6, compress_every=3)
    gen = torch.Generator().manual_seed(1)
    c = _filled_cache(cfg, 2, 80, gen)
    plan = c.plan_prefill(20, 12)
    q = 2 * torch.randn(4, 12, 80, generator=gen)
    qs = 2 * torch.randn(4, 12, 80, generator=gen)
    kv = c.update(0, torch.randn(2, 12, 80, generator=gen), torch.randn(2, 12, 80, generator=gen),
                  plan)
    out, _ = _both(q, qs, kv, plan, c.sink, flash_calls)
    assert _rel(out, A.attend(q, q, kv, plan, c.sink)) > 1e-2
    wider = plan.mask.clone()
    wider[:, (plan.key_pos >= 0).nonzero()[-13]] = True  # an evicted window key
    import dataclasses

    assert _rel(out, A.attend(q, qs, kv, dataclasses.replace(plan, mask=wider),
                              c.sink)) > 1e-3


@settings(max_examples=60)
@given(cfg=cache_configs(max_slots=40), t0=st.integers(0, 300), T=st.integers(1, 200),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]))
def test_block_table_lists_every_visible_key(cfg, t0, T, bm, bn):
    """Skipping is safe: every (query, key) pair the plan's mask makes visible lies in a
    key block the table lists for the query's block, every visible sink in the first group
    (scored with the sink query), and the third group (run without a mask) holds only
    visible pairs; and it does skip where it can."""
    if cfg.policy == "dense":
        cfg = CacheConfig(policy="dense", max_len=t0 + T, kv_dtype=cfg.kv_dtype)
    c = make_cache(cfg, _Spec(1, 16))
    plan = c.plan_prefill(t0, T)
    idx, cnts = block_table(plan.key_pos, plan.q_lo, plan.q_ti, c.sink, bm, bn)
    n_qb, n_kb = idx.shape
    assert (cnts[:, 0] <= cnts[:, 1]).all() and (cnts[:, 1] <= cnts[:, 2]).all()
    assert c.sink or not cnts[:, 0].any()
    cnt = cnts[:, 2]
    qb = torch.arange(T) // bm
    kb = torch.arange(plan.key_pos.numel()) // bn
    groups = []
    for g in range(3):
        m = torch.zeros(n_qb, n_kb, dtype=torch.bool)
        for b in range(n_qb):
            lo_i = int(cnts[b, g - 1]) if g else 0
            sel = idx[b, lo_i:cnts[b, g]].tolist()
            assert sel == sorted(sel)
            m[b, sel] = True
        groups.append(m[qb[:, None], kb[None, :]])  # [T, Nk]: pair's block in group g
    listed = groups[0] | groups[1] | groups[2]
    assert not (plan.mask & ~listed).any()
    is_sink = (plan.key_pos >= 0) & (plan.key_pos < c.sink)
    assert not (plan.mask & is_sink[None, :] & ~groups[0]).any()  # sinks: the sink query
    assert plan.mask[groups[2]].all()  # the unmasked group: every pair visible
    if cfg.policy != "dense" and T >= 4 * max(bm, bn) and c.slots + T > 4 * bn:
        assert int(cnt.sum()) < n_qb * n_kb  # a bounded window: far blocks skipped


def test_head_split():
    assert head_split(80) == (64, 16)
    assert head_split(64) == (64, 0)
    assert head_split(96) == (64, 32)
    assert head_split(8) == (16, 0)
    assert head_split(72) == (128, 0)
    assert head_split(128) == (128, 0)


@settings(max_examples=8)
@given(shape=st.sampled_from([(4, 2, 80, 20), (4, 4, 8, 8), (3, 1, 64, 64), (2, 2, 16, 4)]),
       T=st.integers(1, 40), t0=st.integers(0, 10**7), seed=st.integers(0, 2**16))
def test_prefill_rope_equals_rope_apply(shape, T, t0, seed):
    """The one-pass key rotary + layout kernel gives what ``rope.apply`` and the transposes
    give (partial rotary, GQA, positions up to 10^7)."""
    H, Hkv, D, rd = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, H + 2 * Hkv, D, generator=gen).to(DEV)
    f = rope.inv_freq(rd, 10000.0, device=DEV)
    rot = rope.cos_sin(torch.arange(t0, t0 + T, device=DEV), f, torch.float32)
    k, v = prefill_rope(qkv, H, Hkv, rot)
    rq, rk, rv = qkv.transpose(0, 1).split((H, Hkv, Hkv))
    torch.testing.assert_close(k, rope.apply(rk, *rot), rtol=1e-6, atol=1e-6)
    assert torch.equal(v, rv)
    assert all(t.is_contiguous() for t in (k, v))
    # queries=True (the flash-q-rope layout): q at the text positions, q_sink at others
    sink = rope.cos_sin(torch.arange(T, device=DEV) % 4, f, torch.float32)
    q, qs, k2, v2 = prefill_rope(qkv, H, Hkv, rot, sink, queries=True)
    torch.testing.assert_close(q, rope.apply(rq, *rot), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qs, rope.apply(rq, *sink), rtol=1e-6, atol=1e-6)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    q1, none, _, _ = prefill_rope(qkv, H, Hkv, rot, None, queries=True)
    assert none is None and torch.equal(q1, q)


@on_interpreter
@settings(max_examples=10)
@given(cfg=cache_configs(), shape=st.sampled_from([(4, 2, 80, 20), (4, 4, 80, 80),
                                                   (4, 2, 64, 64), (2, 1, 8, 8)]),
       t0=st.integers(0, 80), T=st.integers(2, 36), big=st.booleans(),
       seed=st.integers(0, 2**16))
def test_flash_kernel_rotates_q_like_rope_apply(flash_calls, cfg, shape, t0, T, big, seed):
    """Raw queries read strided from qkv and rotated in the kernel (text positions, and the
    sink query at its cache slot or text position) give ``attend`` on queries rotated by
    ``rope.apply``: partial and full rotary, GQA, positions up to 10^7."""
    Hq, Hkv, D, rd = shape
    if cfg.policy == "dense":
        t0 = t0 % (cfg.max_len + 1)
        T = max(1, min(T, cfg.max_len - t0))
        if T < 2:
            t0, T = 0, cfg.max_len
    gen = torch.Generator().manual_seed(seed)
    c = _filled_cache(cfg, Hkv, D, gen)
    if big:
        c.position_offset = 10**7
    plan = c.plan_prefill(t0, T)
    f = rope.inv_freq(rd, 10000.0)
    rot = rope.cos_sin(plan.q_pos, f, torch.float32)
    rot_s = rope.cos_sin(plan.q_pos_sink, f, torch.float32) if c.sink else None
    qkv = 2 * torch.randn(T, Hq + 2 * Hkv, D, generator=gen)
    q = qkv[:, :Hq].transpose(0, 1)  # strided, as the model passes it
    kv = c.update(0, torch.randn(Hkv, T, D, generator=gen), torch.randn(Hkv, T, D, generator=gen),
                  plan)
    before = flash_calls.n
    out = A.attend(q, None, kv, plan, c.sink, flash=True, rot=rot, rot_sink=rot_s)
    assert flash_calls.n == before + 1
    ref = A.attend(rope.apply(q, *rot), rope.apply(q, *rot_s) if c.sink else None, kv, plan,
                   c.sink)
    assert _rel(out, ref) < 1e-5, (cfg, shape, t0, T)
    assert _rel(A.attend(q, None, kv, plan, c.sink, rot=rot, rot_sink=rot_s), ref) < 1e-6
    if c.sink and (plan.q_pos_sink != plan.q_pos).any() and (plan.key_pos[:c.sink] >= 0).any():
        wrong = A.attend(q, None, kv, plan, c.sink, flash=True, rot=rot, rot_sink=rot)
        assert _rel(wrong, ref) > 1e-4  # the sink rotation is checked, not passed by


def _norms(N, bias, gen, dtype=torch.float32, device="cpu"):
    norms = [torch.nn.LayerNorm(N, eps=1e-5, bias=bias) for _ in range(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(1 + torch.randn(N, generator=gen))
            if bias:
                n.bias.copy_(torch.randn(N, generator=gen))
    return [n.to(device, dtype) for n in norms]


@settings(max_examples=10)
@given(N=st.sampled_from([8, 20, 96, 160, 2560 // 8, 1000]), T=st.integers(1, 9),
       bias=st.booleans(), rb=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**16))
def test_dual_layer_norm_equals_two_layer_norms(N, T, bias, rb, scale, seed):
    """Both LayerNorms from one pass equal ``nn.LayerNorm`` twice (widths not a power of
    two, with and without biases, large and small inputs, a strided x), and the residual
    output is x plus the given bias."""
    gen = torch.Generator().manual_seed(seed)
    n1, n2 = _norms(N, bias, gen, device=DEV)
    x = (scale * (torch.randn(T, N + 3, generator=gen) + 2)).to(DEV)[:, :N]  # row stride N+3
    b = torch.randn(N, generator=gen).to(DEV) if rb else None
    y1, y2, r = dual_layer_norm(x, n1, n2, b)
    torch.testing.assert_close(y1, n1(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, n2(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, x + b if rb else x, rtol=0, atol=0)
    assert r.data_ptr() != x.data_ptr()


@on_interpreter
def test_parallel_block_takes_the_fused_norm_and_addmm(tiny_neox, monkeypatch):
    """On the flash path a GPT-NeoX block (parallel residual, LayerNorm) runs the dual norm
    and the addmm residual; the whole-model property test checks its logits and cache."""
    calls = []
    fn = PN.dual_layer_norm
    monkeypatch.setattr(PN, "dual_layer_norm", lambda *a: calls.append(1) or fn(*a))
    cfg = CacheConfig(policy="streaming", sink=2, window=6)
    out = Decoder.build(tiny_neox.model, cfg, prefill_kernel="flash").prefill(
        list(range(1, 20)), all_logits=True)
    assert len(calls) == tiny_neox.spec.num_layers
    ref = Decoder.build(tiny_neox.model, cfg, prefill_kernel="reference").prefill(
        list(range(1, 20)), all_logits=True)
    assert _rel(out, ref) < 1e-5


# ------------------------------------------------------------------ whole model
@on_interpreter
@settings(max_examples=4)  # the kernel-level property above covers the policies more widely
@given(family=st.sampled_from(FAMILIES), cfg=cache_configs(max_slots=20),
       n=st.integers(2, 32), chunk=st.sampled_from([None, 5, 16, 32]), seed=st.integers(0, 99))
def test_decoder_prefill_flash_equals_reference(tiny_models, flash_calls, family, cfg, n,
                                                chunk, seed):
    """All logits and the cache left behind, through the flash kernel and the reference."""
    if cfg.policy == "dense":
        cfg = CacheConfig(policy="dense", max_len=n, position_mode=cfg.position_mode,
                          kv_dtype=cfg.kv_dtype)
    lm = tiny_models[family]
    ids = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))
    out = {}
    for kernel in ("flash", "flash-q-rope", "reference"):  # q rotated in the kernel / before
        before = flash_calls.n
        dec = Decoder.build(lm.model, cfg, chunk_size=chunk, prefill_kernel=kernel)
        out[kernel] = (dec.prefill(ids, all_logits=True), dec.cache)
        if kernel == "reference":
            assert flash_calls.n == before
        elif n > 1 and (chunk is None or chunk > 1):
            assert flash_calls.n > before
    b, cb = out.pop("reference")
    for a, ca in out.values():
        flipped = False
        for x, y in zip(ca.storage.__dict__.values(), cb.storage.__dict__.values()):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                assert _rel(x, y) < 1e-5 or float(y.abs().max()) == 0.0
            elif isinstance(x, torch.Tensor) and x.dtype == torch.int8:
                diff = (x.long() - y.long()).abs().max()
                assert diff <= 1  # int8 codes: a rounding apart
                flipped |= bool(diff)
        # a code one step off (fp32 sums in another order, at a rounding boundary) moves
        # the later logits by ~1e-5; with every code equal they agree to fp32 rounding
        assert _rel(a, b) < (1e-3 if flipped else 1e-5)


@on_interpreter
def test_flash_prefill_builds_no_dense_mask(tiny_neox, flash_calls, monkeypatch):
    """The plan's [T, Nk] mask is built on first read only, and the flash path never reads
    it (the kernel takes key_pos, q_lo, q_ti); the reference path still gets it."""
    cfg = CacheConfig(policy="streaming", sink=2, window=6, compress_every=3)
    dec = Decoder.build(tiny_neox.model, cfg, chunk_size=9, prefill_kernel="flash")
    monkeypatch.setattr(dec.cache, "_mask", lambda *a: pytest.fail("dense mask built"))
    dec.prefill(list(range(1, 30)))
    assert flash_calls.n > 0
    ref = Decoder.build(tiny_neox.model, cfg, chunk_size=9, prefill_kernel="reference")
    plan = ref.cache.plan_prefill(0, 9)
    assert plan._mask is None and plan.mask.shape == (9, ref.cache.slots + 9)


@on_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_ppl_with_flash_equals_token_by_token(tiny_models, flash_calls, family):
    """The exact parallel evaluator on the flash kernel, one chunk (the default chunking)
    into a 2+7 lazy streaming cache, against token-by-token feeding."""
    lm = tiny_models[family]
    ids = torch.randint(0, 97, (48,), generator=torch.Generator().manual_seed(7))
    spec = EvalSpec(mode="streaming", sink=2, window=7, compress_every=3,
                    prefill_kernel="flash")
    par = evaluate(lm.model, ids, spec)
    assert flash_calls.n == lm.spec.num_layers  # one chunk
    tok = evaluate(lm.model, ids, EvalSpec(**{**spec.to_dict(), "method": "token",
                                              "prefill_kernel": "auto"}))
    assert flash_calls.n == lm.spec.num_layers
    assert abs(par.ppl / tok.ppl - 1) < 1e-4
    np.testing.assert_allclose(par.nll, tok.nll, atol=1e-4)


# ------------------------------------------------------------------ chunking and the head
@on_interpreter
def test_default_chunks_follow_the_attention_path(tiny_llama):
    cfg = CacheConfig(policy="streaming", sink=1, window=6, compress_every=2)
    def chunk(**kw):
        return Decoder.build(tiny_llama.model, cfg, **kw).prefill_chunk()

    assert chunk(prefill_kernel="reference") == REFERENCE_CHUNK
    assert chunk(prefill_kernel="flash") == FLASH_CHUNK
    assert chunk(prefill_kernel="flash", chunk_size=7) == 7
    assert chunk() == REFERENCE_CHUNK  # auto on the CPU: the reference


def test_head_runs_on_the_asked_rows_only(tiny_neox):
    """prefill() without all_logits puts one row through the head (none for the chunks
    before the last), and gives the same last logits as all_logits."""
    rows = []
    hook = tiny_neox.model.lm_head.register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        cfg = CacheConfig(policy="streaming", sink=2, window=5)
        ids = list(range(1, 30))
        last = Decoder.build(tiny_neox.model, cfg, chunk_size=8).prefill(ids)
        assert rows == [0, 0, 0, 1]
        rows.clear()
        full = Decoder.build(tiny_neox.model, cfg, chunk_size=8).prefill(ids, all_logits=True)
        assert rows == [8, 8, 8, 5]
    finally:
        hook.remove()
    assert _rel(last, full[-1]) < 1e-6  # a one-row matmul may round differently


def test_prefill_kernel_choice_errors(monkeypatch, tiny_llama):
    cfg = CacheConfig(policy="streaming", sink=1, window=6)
    with pytest.raises(ConfigError, match="prefill kernel 'fast' is not one of"):
        Decoder.build(tiny_llama.model, cfg, prefill_kernel="fast")
    with pytest.raises(ConfigError, match="prefill kernel 'fast' is not one of"):
        EvalSpec(mode="dense", prefill_kernel="fast").chunk_for("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeviceError, match="runs on CUDA"):
        A.flash_prefill_enabled("flash", "cpu")
    assert not A.flash_prefill_enabled("auto", "cpu")  # auto on the CPU: the reference
    assert A.flash_prefill_enabled("auto", "cuda")


# ------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("cfg", [
    CacheConfig(policy="streaming", sink=4, window=500, compress_every=1),
    CacheConfig(policy="streaming", sink=4, window=300, compress_every=64, kv_dtype="int8",
                position_mode="absolute"),
    CacheConfig(policy="dense", max_len=2048)])
def test_flash_kernel_on_cuda_bf16(flash_calls, cfg, shape):
    Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(0)
    c = _filled_cache(cfg, Hkv, D, gen)
    c.storage.__dict__.update({k: v.cuda() for k, v in c.storage.__dict__.items()})
    c._sink_ar, c._ring_ar = c._sink_ar.cuda(), c._ring_ar.cuda()
    if c.storage.k.is_floating_point():
        c.storage.k, c.storage.v = c.storage.k.bfloat16(), c.storage.v.bfloat16()
    T = 700 if cfg.policy != "dense" else 1000
    plan = c.plan_prefill(900 if cfg.policy != "dense" else 1000, T)
    q, qs = (2 * torch.randn(Hq, T, D, generator=gen).bfloat16().cuda() for _ in range(2))
    kv = c.update(0, torch.randn(Hkv, T, D, generator=gen).bfloat16().cuda(),
                  torch.randn(Hkv, T, D, generator=gen).bfloat16().cuda(), plan)
    out, ref = _both(q, qs if c.sink else None, kv, plan, c.sink, flash_calls)
    assert _rel(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_dual_layer_norm_on_cuda_bf16():
    gen = torch.Generator().manual_seed(0)
    n1, n2 = _norms(2560, True, gen, torch.bfloat16, "cuda")
    x = torch.randn(3000, 2560, generator=gen).bfloat16().cuda()
    b = torch.randn(2560, generator=gen).bfloat16().cuda()
    y1, y2, r = dual_layer_norm(x, n1, n2, b)
    assert _rel(y1, n1(x)) < 1e-2 and _rel(y2, n2(x)) < 1e-2
    assert _rel(r, x + b) < 1e-2


# ------------------------------------------------------------------ the bench's TTFT / total
def test_bench_reports_ttft_and_total_beside_the_peers(tmp_path, capsys):
    """``fastdecode bench --peer-total``: time to first token and total time for us and
    for the peer run on our own shape (prompt and decode lengths), and their ratio."""
    pytest.importorskip("transformers")
    from fastdecode.cli import main

    out = tmp_path / "rec.json"
    rc = main(["bench", "--model", "tiny-neox", "--device", "cpu", "--window", "12",
               "--sink", "2", "--prompt-len", "30", "--decode-len", "8",
               "--warmup-tokens", "2", "--compile", "none", "--peers", "hf-eager",
               "--peer-prompt-len", "8", "--peer-decode-len", "4", "--peer-warmup-tokens", "1",
               "--peer-total", "--json", str(out)])
    assert rc == 0
    import json

    rec = json.loads(out.read_text())
    r = rec["result"]
    assert 0 < r["ttft_ms"] == r["prefill_ms"] < r["total_ms"]
    peer = rec["peers"]["hf-eager"]
    assert peer["prompt_len"] == 8 and 0 < peer["ttft_ms"] < peer["total_ms"]
    tot = rec["peers_total"]["hf-eager"]
    assert tot["prompt_len"] == 30 and tot["decode_len"] == 8
    assert 0 < tot["ttft_ms"] < tot["total_ms"]
    assert tot["ours_total_ratio"] == pytest.approx(r["total_ms"] / tot["total_ms"])
    assert "hf-eager (our shape)" in capsys.readouterr().out
