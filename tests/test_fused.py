"""The fused decode step (fastdecode.fused) equals the eager model, kernel by kernel and
step by step, on random inputs.

On the CPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before they are defined); on CUDA (gpu marker) compiled, tuned and captured in a graph.
The eager model is the reference (itself held to the paper's re-rotating cache in
test_cache_properties and to transformers in test_hf_parity).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")
pytest.importorskip("triton")

from fastdecode.cache import CacheConfig  # noqa: E402
from fastdecode.engine import Decoder  # noqa: E402
from fastdecode.errors import ConfigError  # noqa: E402
from fastdecode.fused import FusedOptions, FusedStep, table, tune  # noqa: E402
from fastdecode.quant.int4 import dequantize_int4, quantize_int4  # noqa: E402
from fastdecode.quant.int8 import quantize_int8  # noqa: E402
from fastdecode.quant.layout import FLOAT, INT4, INT8, Packed  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
OPTS = FusedOptions.from_env()  # the tests are an edge: FASTDECODE_TUNE=0 on CUDA runs


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- GEMV
def _packed(fmt: int, w: torch.Tensor, group: int, bias):
    if fmt == FLOAT:
        return Packed(FLOAT, w, None, None, w.shape[1], bias), w.double()
    if fmt == INT8:
        q, s = quantize_int8(w)
        return Packed(INT8, q, s[:, None].contiguous(), None, w.shape[1], bias), \
            q.double() * s.double()[:, None]
    p, s, z = quantize_int4(w, group)
    return Packed(INT4, p, s, z, group, bias), dequantize_int4(p, s, z, group).double()


def _norm_ref(x, w, b, kind, eps, dtype=None):
    """The norm in float64; with ``dtype``, rounded where the eager module rounds
    (LayerNorm: once, at the end; RMSNorm: the normalised x, then x times the weight)."""
    rnd = (lambda t: t.to(dtype).double()) if dtype is not None else (lambda t: t)  # noqa: E731
    x = x.double()
    if kind == 1:
        return rnd((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps) * w.double()
                   + b.double())
    return rnd(rnd(x / torch.sqrt((x * x).mean() + eps)) * w.double())


def _opts(**pins) -> FusedOptions:
    """The options with some code paths pinned; None lets the tuner choose."""
    return dataclasses.replace(OPTS, **pins)


@given(fmt=st.sampled_from([FLOAT, INT8, INT4]), norm=st.sampled_from([0, 1, 2]),
       kind=st.sampled_from(["plain", "segments", "glu"]), res=st.booleans(),
       bias=st.booleans(), kb=st.integers(1, 3), nb=st.integers(1, 6),
       group=st.sampled_from([32, 64]), seed=st.integers(0, 2**16),
       asm=st.booleans(), int4=st.sampled_from([0, 1, 2]), pdl=st.booleans(),
       in_gemv=st.booleans(), res2=st.booleans(), parts=st.sampled_from([None, 1, 2, 3, 4]),
       # bfloat16 on CUDA: the interpreter has no bfloat16 dot and rounds casts toward zero
       dtype=st.sampled_from([torch.float32, torch.bfloat16] if CUDA else [torch.float32]))
@settings(max_examples=40)
def test_norm_then_gemv_match_float64_reference(fmt, norm, kind, res, bias, kb, nb, group,
                                                seed, asm, int4, pdl, in_gemv, res2, parts,
                                                dtype):
    """Every code path (on CUDA: inline-PTX conversions or not, the three int4 paths, PDL
    launches or not; the interpreter runs no PTX), the norm by its own kernel or inside the
    GEMV's programs, tensor-core int4 cut into 1-4 input parts (3: parts of unequal size,
    some empty); float32 (accumulation order apart, exact) and bfloat16 (rounded where the
    model rounds: within 1%)."""
    _norm_then_gemv(fmt, norm, kind, res, bias, kb, nb, group, seed, in_gemv, res2, dtype,
                    _opts(asm=asm, int4=int4, pdl=pdl, parts=parts))


def _norm_then_gemv(fmt, norm, kind, res, bias, kb, nb, group, seed, in_gemv=False,
                    res2=False, dtype=torch.float32, opts=OPTS):
    gen = torch.Generator().manual_seed(seed)
    K = 64 * kb + (16 if fmt == FLOAT and kb > 1 else 0)  # ragged K for float: masks
    if fmt == INT4:
        K = group * kb
    n = 8 * nb
    rows = 2 * n if kind == "glu" else n
    md = lambda t: t.to(dtype).float()  # noqa: E731  (values the model dtype holds)
    w = md(torch.randn(rows, K, generator=gen))
    b = torch.randn(rows, generator=gen) if bias else None
    p, wref = _packed(fmt, w, group, b)
    x = md(torch.randn(K, generator=gen) * 3 + 0.5)
    nw = md(torch.rand(2, K, generator=gen) + 0.5)
    nbias = md(torch.randn(2, K, generator=gen))
    nsplit = 4 * (nb // 2 + 1) if kind == "segments" else n
    nsplit = min(nsplit, n)
    gap = 5 if kind == "segments" else 0
    out_len = n + gap
    y = torch.full((out_len,), float("nan"))
    r = md(torch.randn(out_len, generator=gen))
    r2 = md(torch.randn(out_len, generator=gen)) if res2 else None  # a second addend
    if res2 and kind == "segments":
        r2 = None  # the second addend is over rows as stored (no gap): plain layouts only
    if res:
        y = r.clone()
        gap = 0
    dev = lambda t: t.to(DEV) if t is not None else None  # noqa: E731
    dv = lambda t: t.to(DEV, dtype) if t is not None else None  # noqa: E731  (model dtype)
    pd = Packed(p.fmt, dv(p.w) if fmt == FLOAT else dev(p.w), dev(p.s), dev(p.z), p.group,
                dev(p.bias))
    yd = dv(y)
    xin, xseg, in_norm = dv(x), 0, None
    if norm and in_gemv:  # the GEMV normalises x; segment 2 takes the second norm's row
        in_norm = (norm, dv(nw), dv(nbias) if norm == 1 else None, 1e-5)
    elif norm:  # both norms of x, as the step does; segment 2 reads the second
        xin = torch.full((2, K), float("nan"), device=DEV, dtype=dtype)
        tune.norm(dv(x), dv(nw), dv(nbias), xin, norm, 2, 1e-5, opts)
        xseg = K if kind == "segments" else 0
    ws = tune.Workspace(n, DEV)
    tune.gemv(xin, pd, yd, yd if res else None, n=n, opts=opts,
              nsplit=nsplit if kind == "segments" else n, gap=gap, xseg=xseg,
              act2=1 if kind == "segments" else 0, glu=kind == "glu", norm=in_norm,
              res2=dv(r2), ws=ws)
    assert not ws.counts.any()  # every counter back at zero for the next launch
    # reference, float64
    want = torch.empty(out_len, dtype=torch.float64)
    if res:
        want.copy_(r.double())
    for seg, (lo, hi) in enumerate(((0, nsplit), (nsplit, n))):
        if lo >= hi:
            continue
        # the norm's output in the model dtype, rounded as the eager norm module rounds it
        # (an unrounded reference is off by more than 1% where rounding moves a cancelling
        # sum: seen for LayerNorm and for RMSNorm, which rounds twice, with GLU)
        xn = x.double() if norm == 0 else _norm_ref(x, nw[seg], nbias[seg], norm, 1e-5, dtype)
        z = wref[lo:hi] @ xn + (b.double()[lo:hi] if bias else 0)
        if kind == "glu":
            u = wref[n + lo:n + hi] @ xn + (b.double()[n + lo:n + hi] if bias else 0)
            z = torch.nn.functional.silu(z) * u
        if kind == "segments" and seg == 1:
            z = torch.nn.functional.gelu(z)
        off = gap if seg == 1 else 0
        if res:
            want[lo:hi] += z
        else:
            want[lo + off:hi + off] = z
    if r2 is not None:
        want[:n] += r2[:n].double()
    got = yd.cpu().double()
    written = torch.cat((torch.arange(0, nsplit), torch.arange(nsplit, n) + gap))
    assert torch.isfinite(got[written]).all()
    assert _rel(got[written], want[written]) < (1e-5 if dtype == torch.float32 else 1e-2)


# ----------------------------------------------------------------------------- decode plan
@given(policy=st.sampled_from(["streaming", "window", "dense"]), sink=st.integers(1, 5),
       window=st.integers(1, 40), every=st.integers(1, 5),
       mode=st.sampled_from(["cache", "absolute"]), offset=st.sampled_from([0, 12_345_678]),
       ts=st.lists(st.integers(0, 400), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@settings(max_examples=40, deadline=None)
def test_decode_plan_kernel_equals_plan_decode(policy, sink, window, every, mode, offset, ts,
                                               dtype):
    """One launch (mask, slot, cos/sin at both query positions) equals the cache's tensor
    arithmetic (KVCache.plan_decode, then rope.cos_sin) at any position: before the ring
    fills, at the wrap, long after; sinks or none, lazy eviction, both position modes."""
    from fastdecode import rope
    from fastdecode.cache import make_cache
    from fastdecode.models import load_model

    spec = load_model("tiny-neox").spec
    if policy == "dense":
        cfg = CacheConfig(policy="dense", max_len=window + 8)
        ts = [t % (window + 8) for t in ts]
    else:
        cfg = CacheConfig(policy=policy, sink=sink if policy == "streaming" else 0,
                          window=window, compress_every=every, position_mode=mode)
    cache = make_cache(cfg, spec, device=DEV, position_offset=offset)
    freqs = rope.inv_freq(spec.rotary_dim, spec.rope_theta).to(DEV)
    half = freqs.numel()
    mask = torch.full((cache.slots,), 7, dtype=torch.int8, device=DEV)
    slot = torch.full((1,), -5, dtype=torch.int64, device=DEV)
    cs = torch.full((4, half), float("nan"), device=DEV)
    for t in ts:
        pos = torch.tensor([t], device=DEV)
        tune.decode_plan(pos, cache, freqs, cs, mask, slot, dtype, OPTS)
        plan = cache.plan_decode(pos)
        assert torch.equal(mask.bool().cpu(), plan.mask.reshape(-1).cpu()), t
        assert int(slot) == int(plan.decode_slot), t
        sink_pos = plan.q_pos_sink if plan.q_pos_sink is not None else plan.q_pos
        # exact, but for Triton's interpreter rounding float32 to bfloat16 toward zero
        tol = (0, 0) if CUDA or dtype == torch.float32 else (2**-7, 2**-8)
        for i, p in enumerate((plan.q_pos, sink_pos)):
            c, s_ = rope.cos_sin(p, freqs, dtype)
            torch.testing.assert_close(cs[2 * i].cpu(), c[0].float().cpu(), rtol=tol[0],
                                       atol=tol[1])
            torch.testing.assert_close(cs[2 * i + 1].cpu(), s_[0].float().cpu(),
                                       rtol=tol[0], atol=tol[1])


@given(n=st.integers(1, 5000), levels=st.integers(1, 50), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), neg_inf=st.booleans())
@settings(max_examples=30, deadline=None)
def test_argmax_kernel_equals_torch(n, levels, seed, dtype, neg_inf):
    """The greedy token: the first index of the maximum, ties included (few distinct values,
    many blocks), -inf entries too; the position advances by one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n,), generator=gen).to(dtype)
    if neg_inf:
        x[torch.rand(n, generator=gen) < 0.5] = float("-inf")
    tok = torch.full((1,), -1, dtype=torch.int64, device=DEV)
    pos = torch.full((1,), 41, dtype=torch.int64, device=DEV)
    tune.argmax(x.to(DEV), tok, pos, OPTS)
    assert int(tok) == int(torch.argmax(x)) and int(pos) == 42


# ----------------------------------------------------------------------------- whole step
def _check_steps(lm, cfg: CacheConfig, prompt_len: int, steps: int, tol: float, seed: int = 0,
                 dec: Decoder | None = None, fused: FusedStep | None = None,
                 opts: FusedOptions = OPTS):
    """Eager and fused decoders fed the same tokens: logits agree every step, the fused
    step writes the greedy token and advances the position on the device. ``dec`` and
    ``fused``: a fused step already built on ``dec`` (else one is built on a copy)."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, lm.spec.vocab_size, (prompt_len,), generator=gen)
    model = copy.deepcopy(lm.model)  # the fused step re-points its weights (shared fixture)
    ref = Decoder.build(model, cfg)
    dec = dec if dec is not None else Decoder.build(model, cfg)
    a = ref.prefill(prompt)
    dec.prefill(prompt)
    fused = fused if fused is not None else FusedStep(dec, opts)
    tok = torch.argmax(a, -1, keepdim=True)
    errs = []
    for _ in range(steps):
        a = ref.step(tok).float()
        dec.tok_buf.copy_(tok.to(dec.tok_buf.device))
        dec.pos_buf.fill_(dec.t)
        b = fused(dec.tok_buf, dec.pos_buf).float().cpu()
        dec.t += 1
        assert torch.isfinite(b).all()
        errs.append(_rel(b, a.cpu()))
        assert int(dec.pos_buf) == dec.t
        assert int(dec.tok_buf) == int(torch.argmax(b))
        tok = torch.argmax(a, -1, keepdim=True)
    assert max(errs) < tol, errs
    return errs


CASES = {  # model, cache, prompt length, steps
    # the ring (4 sinks + 41 slots) wraps at the second step; 45 slots = two attention splits
    "neox-streaming": ("tiny-neox", CacheConfig(policy="streaming", sink=4, window=40), 43, 3),
    "neox-window-lazy": ("tiny-neox", CacheConfig(policy="window", sink=0, window=20,
                                                  compress_every=3), 30, 2),
    "neox-absolute-int8kv": ("tiny-neox", CacheConfig(policy="streaming", sink=2, window=12,
                                                      position_mode="absolute",
                                                      kv_dtype="int8"), 20, 2),
    "llama-dense-gqa": ("tiny-llama", CacheConfig(policy="dense", max_len=64), 30, 2),
    "llama-streaming-int8kv": ("tiny-llama", CacheConfig(policy="streaming", sink=4, window=36,
                                                         kv_dtype="int8"), 45, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_matches_eager(tiny_models, case):
    name, cfg, prompt_len, steps = CASES[case]
    lm = tiny_models[name]
    if CUDA:
        lm = _on_cuda(lm)
    _check_steps(lm, cfg, prompt_len, steps, tol=1e-4)


def _on_cuda(lm):
    import copy

    lm = copy.copy(lm)
    lm.model = copy.deepcopy(lm.model).to("cuda")
    return lm


SLOW = pytest.mark.slow  # the rest of an exhaustive cross-product: CI runs one of each path


@pytest.mark.parametrize("family,recipe,int4", [
    ("neox", "int8", None), ("llama", "int8", None), ("neox", "int4-mlp-g32", 2),
    ("llama", "int4-mlp-g32", 1), ("neox", "int4-g32+head", 1), ("llama", "int4-g32+head", 2),
    pytest.param("neox", "int4-mlp-g32", 1, marks=SLOW),
    pytest.param("llama", "int4-mlp-g32", 2, marks=SLOW),
    pytest.param("neox", "int4-g32+head", 2, marks=SLOW),
    pytest.param("llama", "int4-g32+head", 1, marks=SLOW)])
def test_fused_step_quantized_matches_eager(family, recipe, int4):
    """Stacked (int8, int4 everywhere: [qkv; up] by rows, [out | down] along the input with
    per-range int8 scales) and mixed formats (int4 MLP next to float attention), on the
    tiny presets (hidden 32: one int4 group of 32 per row of q/k/v); int4 dequantised (path
    1) and on tensor cores (2, where the rows allow)."""
    import copy

    from fastdecode.models import load_model
    from fastdecode.quant import QuantConfig, quantize_model

    lm = copy.copy(load_model(f"tiny-{family}", dtype=torch.float32, device=DEV))
    qc = QuantConfig.parse(recipe)
    if qc.head and lm.spec.tie_embeddings:
        qc = QuantConfig(qc.kind, qc.filter, qc.group_size, head=False)
    quantize_model(lm.model, qc)
    cfg = CacheConfig(policy="streaming", sink=4, window=24)
    _check_steps(lm, cfg, 30, 2, tol=1e-4, opts=_opts(int4=int4))


@pytest.mark.parametrize("recipe,branches", [
    (None, 0), (None, 2), ("int4-mlp-g32", 1), ("int8", 0),  # each default: tests above
    pytest.param("int4-mlp-g32", 0, marks=SLOW), pytest.param("int8", 1, marks=SLOW),
    pytest.param(None, 1, marks=SLOW), pytest.param("int4-mlp-g32", 2, marks=SLOW),
    pytest.param("int8", 2, marks=SLOW)])
def test_fused_neox_layouts_match_eager(tiny_models, recipe, branches):
    """Every layout of a parallel-residual layer: [qkv; up] as one GEMV before attention
    (branches 0); the up projection as its own GEMV (1), or up and down with the MLP's
    output added after the residual (2), on CUDA on a side stream in parallel with q/k/v
    and attention. Float, mixed (int4 MLP beside float attention: a norm launch both
    branches read) and int8 (stacked [out | down] scales, or unstacked again for 2)."""
    import copy

    from fastdecode.quant import QuantConfig, quantize_model

    lm = copy.copy(tiny_models["tiny-neox"])
    lm.model = copy.deepcopy(lm.model).to(DEV)
    if recipe:
        quantize_model(lm.model, QuantConfig.parse(recipe))
    cfg = CacheConfig(policy="streaming", sink=4, window=24)
    opts = _opts(branches=branches)
    step = FusedStep(Decoder.build(copy.deepcopy(lm.model), cfg), opts)
    assert step.branches == branches and (step.side is not None) == (branches > 0 and CUDA)
    assert all((lw.b is None) == (branches == 2 or recipe == "int4-mlp-g32")
               for lw in step.layers)
    _check_steps(lm, cfg, 30, 2, tol=1e-4, opts=opts)


@pytest.mark.parametrize("recipe,int4,want,prio", [
    (None, None, 1, False), ("int4-g32", 1, 1, False), ("int4-g32", 2, 2, False),
    ("int8", None, 2, True), ("int4-mlp-g32", None, 2, False), ("llama", None, 0, False)])
def test_branches_chosen_per_model(tiny_models, recipe, int4, want, prio):
    """Unpinned, the layout follows the formats and the int4 path (choose_branches'
    measured rule), and the main chain is captured at a higher priority beside an int8
    MLP only (choose_priority's); pinned, both follow the pin."""
    import copy

    from fastdecode.fused.step import choose_branches, choose_priority
    from fastdecode.quant import QuantConfig, quantize_model

    model = copy.deepcopy(tiny_models["tiny-llama" if recipe == "llama" else "tiny-neox"].model)
    model = model.to(DEV)  # on CUDA: a side stream, which the priority ranks the main chain over
    if recipe not in (None, "llama"):
        quantize_model(model, QuantConfig.parse(recipe))
    opts = _opts(int4=int4, priority=None, branches=None)
    assert choose_branches(model, opts) == want
    assert choose_priority(model, want, opts) == prio
    assert not choose_priority(model, 1, opts)
    for pin in (False, True):
        assert choose_priority(model, want, _opts(priority=pin)) == pin
    step = FusedStep(Decoder.build(model, CacheConfig(policy="streaming", sink=2, window=8)),
                     opts)
    assert step.branches == want
    assert step.priority == (prio and CUDA)  # one stream on the CPU: nothing to rank


def test_fused_step_asks_a_cache_with_its_own_plan(tiny_models):
    """The one-launch plan knows KVCache's arithmetic only: a cache class that overrides
    plan_decode is asked for its plan every step, and the step still equals eager."""
    import copy

    from fastdecode.cache import StreamingCache

    class OwnPlan(StreamingCache):
        calls = 0

        def plan_decode(self, t):
            OwnPlan.calls += 1
            return super().plan_decode(t)

    model = copy.deepcopy(tiny_models["tiny-neox"].model).to(DEV)
    cfg = CacheConfig(policy="streaming", sink=2, window=10)
    spec = model.spec
    dec = Decoder(model, OwnPlan(cfg, num_layers=spec.num_layers,
                                 num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                 dtype=model.dtype, device=model.device))
    ref = Decoder.build(model, cfg)
    prompt = torch.arange(3, 20, device=DEV)
    a = ref.prefill(prompt)
    dec.prefill(prompt)
    step = FusedStep(dec, OPTS)
    assert step.plan_mask is None
    tok = torch.argmax(a, -1, keepdim=True)
    for _ in range(2):  # past the ring's wrap
        a = ref.step(tok)
        dec.tok_buf.copy_(tok)
        dec.pos_buf.fill_(dec.t)
        before = OwnPlan.calls
        b = step(dec.tok_buf, dec.pos_buf)
        dec.t += 1
        assert OwnPlan.calls == before + 1
        assert _rel(b.float(), a.float()) < 1e-4
        tok = torch.argmax(a, -1, keepdim=True)


def test_env_settings_are_checked():
    """FusedOptions.from_env, the one place the environment is read: FASTDECODE_BRANCHES
    takes 0, 1 or 2 (unset: chosen per model), FASTDECODE_PARTS 1, 2 or 4 (unset: chosen
    per shape), FASTDECODE_ATTN a valid attention launch, the switches (FASTDECODE_PRIORITY,
    _ASM, _PDL, _TUNE) 0 or 1; anything else is an error naming the variable, not a silent
    default. The object itself validates the same way."""
    def env(var, v):
        return FusedOptions.from_env({f"FASTDECODE_{var}": v})

    assert FusedOptions.from_env({}) == FusedOptions()
    for v, want in (("", None), ("0", False), ("1", True)):
        assert env("PRIORITY", v).priority is want
    for var in ("PDL", "TUNE"):
        assert getattr(env(var, "0"), var.lower()) is False
        assert getattr(env(var, ""), var.lower()) is True
    for bad in ("2", "yes", "off"):
        with pytest.raises(ConfigError, match="FASTDECODE_PRIORITY"):
            env("PRIORITY", bad)
    for v, want in (("", None), ("0", 0), ("2", 2)):
        assert env("BRANCHES", v).branches == want
    for bad in ("3", "yes", "-1"):
        with pytest.raises(ConfigError, match="FASTDECODE_BRANCHES"):
            env("BRANCHES", bad)
    for v, want in (("", None), ("1", 1), ("4", 4)):
        assert env("PARTS", v).parts == want
    for bad in ("0", "3", "two"):
        with pytest.raises(ConfigError, match="FASTDECODE_PARTS"):
            env("PARTS", bad)
    for v, want in (("", None), ("64,16,1", (64, 16, 1)), ("128,32,4", (128, 32, 4))):
        assert env("ATTN", v).attn == want
    for bad in ("64,16", "16,16,1", "48,32,1", "64,16,3", "a,b,c"):
        with pytest.raises(ConfigError, match="FASTDECODE_ATTN"):
            env("ATTN", bad)
    assert env("NORM_IN_GEMV", "2").norm_in_gemv == 2
    assert FusedOptions.from_env({"FASTDECODE_INT4": "1"}, int4=2).int4 == 2  # overrides win
    for bad in ({"branches": 3}, {"tune": 1}, {"asm": "yes"}, {"parts": 5},
                {"attn": (64, 16, 3)}, {"norm_in_gemv": None}):
        with pytest.raises(ConfigError):
            FusedOptions(**bad)


def test_fused_layouts_switch_on_one_model(tiny_models):
    """A model stacked [out | down] by one step, then unstacked by a step with the MLP on
    its own stream (and back): both decode as eager, and the eager model, whose linears
    hold views of each new layout, still gives the same logits."""
    import copy

    lm = copy.copy(tiny_models["tiny-neox"])
    lm.model = copy.deepcopy(lm.model).to(DEV)
    cfg = CacheConfig(policy="streaming", sink=4, window=24)
    prompt = torch.arange(3, 23, device=DEV)
    before = Decoder.build(lm.model, cfg).prefill(prompt)
    for branches in (1, 2, 1):
        step = FusedStep(Decoder.build(lm.model, cfg), _opts(branches=branches))
        assert (step.layers[0].b is None) == (branches == 2)
        assert lm.model.layout.layers is step.layers
        _check_steps(lm, cfg, 20, 1, tol=1e-4, opts=_opts(branches=branches))
    torch.testing.assert_close(Decoder.build(lm.model, cfg).prefill(prompt), before,
                               rtol=0, atol=0)


@pytest.mark.parametrize("recipe", [None, "int8", "int4-g32"])
def test_a_step_keeps_its_weights_when_another_layout_restacks(tiny_models, recipe):
    """A step with the MLP apart (branches 2), then one with [out | down] stacked on the
    same model (branches 1), which gives the model a new layout: the first step's weights
    stay where they were (a CUDA graph captured over them reads those addresses; Pythia
    int8 graphed that way read freed memory) and it still decodes as eager."""
    import copy

    from fastdecode.quant import QuantConfig, quantize_model

    lm = copy.copy(tiny_models["tiny-neox"])
    lm.model = copy.deepcopy(lm.model).to(DEV)
    if recipe:
        quantize_model(lm.model, QuantConfig.parse(recipe))
    cfg = CacheConfig(policy="streaming", sink=4, window=24)

    def ptrs(step):
        return [t.data_ptr() for lw in step.layers
                for p in (lw.qkv, lw.up, lw.a, lw.out, lw.down, lw.b) if p is not None
                for t in (p.w, p.s, p.z) if t is not None]

    dec = Decoder.build(lm.model, cfg)
    first = FusedStep(dec, _opts(branches=2))
    before = ptrs(first)
    second = FusedStep(Decoder.build(lm.model, cfg), _opts(branches=1))
    assert second.layers[0].b is not None and first.layers[0].b is None
    assert ptrs(first) == before
    _check_steps(lm, cfg, 12, 1, tol=1e-4, dec=dec, fused=first, opts=_opts(branches=2))


def _storages(model) -> dict[int, int]:
    """Every distinct storage the model's parameters and buffers live in -> its bytes."""
    out = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st_ = t.untyped_storage()
        out[st_.data_ptr()] = st_.nbytes()
    return out


def test_fused_weights_share_the_model_memory(tiny_models):
    """The layout is the model's own storage: its linears hold views of the stacks (one
    copy: the bytes the model holds do not grow, and every GEMV operand of the step lies in
    the model's storage), in-place updates reach both, the model gains no attribute it does
    not declare, and the layout is built once per model and module set."""
    import copy

    from fastdecode.quant import QuantConfig, quantize_model

    lm = tiny_models["tiny-neox"]
    model = copy.deepcopy(lm.model)
    assert model.layout is None  # declared by the model, empty until built
    attrs = set(vars(model))
    bytes_before = sum(_storages(model).values())
    dec = Decoder.build(model, CacheConfig(policy="streaming", sink=4, window=16))
    dec_attrs = set(vars(dec))
    step = FusedStep(dec, OPTS)
    assert set(vars(model)) == attrs and set(vars(dec)) == dec_attrs
    assert model.layout is not None and model.layout.layers is step.layers
    lw = step.layers[0]
    layer = model.layers[0]
    assert lw.a is not None and lw.b is not None  # NeoX: [qkv; up] and [out | down]
    assert layer.attn.qkv.weight.data_ptr() == lw.a.w.data_ptr()
    assert layer.mlp.down.weight.untyped_storage().data_ptr() == \
        lw.b.w.untyped_storage().data_ptr()
    own = _storages(model)
    assert sum(own.values()) == bytes_before  # re-arranged, not copied
    for lw_ in step.layers:
        for p in (lw_.qkv, lw_.up, lw_.a, lw_.out, lw_.down, lw_.b):
            if p is not None:
                assert p.w.untyped_storage().data_ptr() in own
    with torch.no_grad():
        layer.mlp.up.weight.mul_(2)
    n_qkv = layer.attn.qkv.weight.shape[0]
    torch.testing.assert_close(lw.a.w[n_qkv:], layer.mlp.up.weight)
    assert FusedStep(dec, OPTS).layers is step.layers  # built once per model

    quantize_model(model, QuantConfig.parse("int8"))  # new modules: stacked anew
    bytes_q = sum(_storages(model).values())
    again = FusedStep(Decoder.build(model, CacheConfig(policy="streaming", sink=4, window=16)),
                      OPTS)
    assert again.layers is not step.layers and again.layers[0].a.fmt == INT8
    assert sum(_storages(model).values()) == bytes_q


def test_compile_decoder_declares_what_it_sets(tiny_models):
    """compile_decoder sets only what Decoder declares (step_fn, compiled)."""
    import copy

    from fastdecode.compile import compile_decoder

    model = copy.deepcopy(tiny_models["tiny-llama"].model).to(DEV)
    dec = Decoder.build(model, CacheConfig(policy="streaming", sink=2, window=10))
    attrs = set(vars(dec))
    assert dec.compiled is None
    step = compile_decoder(dec, "default", kernels="fused", options=OPTS)
    assert set(vars(dec)) == attrs and dec.compiled is step and dec.step_fn is step
    assert step._fn.opts is OPTS


def test_fused_bf16_close_to_eager_and_finite(tiny_models):
    from fastdecode.models import load_model

    lm = load_model("tiny-neox", dtype=torch.bfloat16, device=DEV)
    errs = _check_steps(lm, CacheConfig(policy="streaming", sink=4, window=20), 26, 2,
                        tol=3e-2)
    assert max(errs) > 0  # really bf16 (not silently float32)


@given(family=st.sampled_from(["tiny-neox", "tiny-llama"]), sink=st.integers(0, 4),
       window=st.integers(4, 30), every=st.integers(1, 4),
       mode=st.sampled_from(["cache", "absolute"]), kv=st.sampled_from(["auto", "int8"]),
       prompt=st.integers(1, 70), seed=st.integers(0, 1000))
@settings(max_examples=3)
def test_fused_step_property(tiny_models, family, sink, window, every, mode, kv, prompt, seed):
    """Any bounded policy, any prompt length (ring wrapped or not), both families."""
    policy = "streaming" if sink else "window"
    cfg = CacheConfig(policy=policy, sink=sink, window=window, compress_every=every,
                      position_mode=mode, kv_dtype=kv)
    lm = tiny_models[family]
    _check_steps(_on_cuda(lm) if CUDA else lm, cfg, prompt, 2, tol=1e-4, seed=seed)


def test_generate_through_the_fused_step_equals_eager(tiny_models):
    """The path `fastdecode generate --compile default --kernels fused` takes: sampling and
    greedy decoding through CompiledStep give the same tokens as eager."""
    import copy

    from fastdecode.compile import compile_decoder
    from fastdecode.engine import generate

    lm = tiny_models["tiny-llama"]
    model = copy.deepcopy(lm.model).to(DEV)
    cfg = CacheConfig(policy="streaming", sink=2, window=10)
    prompt = list(range(5, 17))
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
        want = list(generate(Decoder.build(model, cfg), prompt, 3, **kw))
        dec = Decoder.build(model, cfg)
        step = compile_decoder(dec, "default", kernels="fused")
        assert step.kernels == "fused"
        assert list(generate(dec, prompt, 3, **kw)) == want


# ----------------------------------------------------------------------------- launch table
H200 = table.Device("NVIDIA H200", (9, 0), 132)
A800 = table.Device("NVIDIA A800-SXM4-80GB", (8, 0), 108)
PYTHIA_GEMVS = [  # (format, rows, inputs, norm inside): every GEMV of Pythia-2.8B's step in
    # the bf16, int8, int4-mlp-g128 and int4-g128 recipes (the sweep's shapes)
    (FLOAT, 7680, 2560, 1), (FLOAT, 10240, 2560, 1), (FLOAT, 2560, 12800, 0),
    (FLOAT, 50304, 2560, 1), (FLOAT, 7680, 2560, 0), (FLOAT, 2560, 2560, 0),
    (INT8, 7680, 2560, 0), (INT8, 10240, 2560, 0), (INT8, 2560, 2560, 0), (INT8, 2560, 10240, 0),
    (INT4, 7680, 2560, 0), (INT4, 10240, 2560, 0), (INT4, 2560, 2560, 0), (INT4, 2560, 10240, 0),
    (INT4, 2560, 12800, 0)]


def _meta(fmt: int, n: int, k: int, group: int = 128) -> Packed:
    """A weight of this shape with no memory (the launch choice reads shapes only)."""
    w = torch.empty(n, k // 2 if fmt == INT4 else k, device="meta",
                    dtype={FLOAT: torch.bfloat16, INT8: torch.int8, INT4: torch.uint8}[fmt])
    return Packed(fmt, w, None, None, group if fmt == INT4 else k, None)


def _choices(dev, opts=OPTS) -> dict:
    out = {}
    for fmt, n, k, norm in PYTHIA_GEMVS:
        p = _meta(fmt, n, k)
        ws = tune.Workspace(n, "meta")
        cfg, source, _ = tune.choose(p, n, n, torch.bfloat16, opts, dev, ws=ws, norm=norm)
        assert tune.admissible(cfg, p, n, n, torch.bfloat16, opts, ws=ws)
        out[table.shape_key(p, n, torch.bfloat16, norm, False)] = (list(cfg), source)
    return out


def test_launches_come_from_the_card_table_untimed(monkeypatch):
    """On an H200 every GEMV of the Pythia step takes the bundled table's entry (the
    graphed sweep's winner), on an A800 (no table yet) the heuristic, both admissible; no
    launch is timed (do_bench would raise), so every process chooses the same."""
    import triton.testing

    def no_timing(*a, **k):
        raise AssertionError("a launch was timed")

    monkeypatch.setattr(triton.testing, "do_bench", no_timing)
    h200 = table.for_device(H200)
    assert h200 is not None and h200.name == "h200" and table.for_device(A800) is None
    got = _choices(H200)
    assert set(got) <= set(h200.gemv) and len(got) == len(PYTHIA_GEMVS)
    for key, (cfg, source) in got.items():
        assert source == "h200" and tuple(cfg) == h200.gemv[key], key
    assert {s for _, s in _choices(A800).values()} == {"heuristic"}
    # pinned paths rule an entry out: the heuristic under the same pins
    pinned = _choices(H200, _opts(asm=False, parts=2))
    for key, (cfg, _) in pinned.items():
        assert cfg[4] is False and (cfg[5] != 2 or cfg[6] == 2), key
    assert {s for _, s in _choices(H200, _opts(tune=False)).values()} == {"heuristic"}


def test_two_processes_choose_the_same_launches():
    """A fresh interpreter with another hash seed: the same choice for every shape as this
    process's, on a card with a table and on one without."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_fused as t; "
            "print(json.dumps([t._choices(t.H200), t._choices(t.A800)]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TRITON_INTERPRET="1")
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "4343"  # not ours
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                         env=dict(env, PYTHONHASHSEED=seed))
    assert json.loads(run.stdout) == json.loads(json.dumps([_choices(H200), _choices(A800)]))


def test_a_table_file_is_checked_and_pins_win(tmp_path):
    """A table given by path (FusedOptions.launch_table): its entries for its own card;
    shapes it lacks, or entries the launch cannot take (a pinned path, BLOCK_N not dividing
    the segments), take the heuristic; a table of another card, or a malformed one, is an
    error naming the file."""
    import json

    dev = table.Device("Fake GPU 9000", (8, 6), 40)
    p = _meta(INT8, 512, 1024)
    key = table.shape_key(p, 512, torch.bfloat16, 0, False)
    entry = [16, 256, 8, 2, True, 0, 1]
    path = tmp_path / "launch-fake.json"
    path.write_text(json.dumps({"class": "fake", "devices": [dev.name], "capability": [8, 6],
                                "gemv": {key: {"cfg": entry}}}))
    opts = _opts(launch_table=str(path))
    cfg, source, t = tune.choose(p, 512, 512, torch.bfloat16, opts, dev)
    assert (list(cfg), source, t.name) == (entry, "fake", "fake")
    other = _meta(INT8, 256, 1024)
    assert tune.choose(other, 256, 256, torch.bfloat16, opts, dev)[1] == "heuristic"
    for why in (_opts(launch_table=str(path), asm=False), _opts(launch_table=str(path),
                                                                tune=False)):
        cfg, source, _ = tune.choose(p, 512, 512, torch.bfloat16, why, dev)
        assert source == "heuristic" and tune.admissible(cfg, p, 512, 512, torch.bfloat16, why)
    cfg, source, _ = tune.choose(p, 512, 24, torch.bfloat16, opts, dev)  # segments of 24 rows
    assert source == "heuristic" and 24 % cfg[0] == 0
    with pytest.raises(ConfigError, match="launch-fake.json.*not NVIDIA H200"):
        tune.choose(p, 512, 512, torch.bfloat16, opts, H200)
    bad = tmp_path / "launch-bad.json"
    for text in ("{", json.dumps({"devices": [dev.name], "capability": [8, 6],
                                  "gemv": {key: {"cfg": [16, 256]}}})):
        bad.write_text(text)
        table.load.cache_clear()
        with pytest.raises(ConfigError, match="launch-bad.json"):
            tune.choose(p, 512, 512, torch.bfloat16, _opts(launch_table=str(bad)), dev)
    assert FusedOptions.from_env({"FASTDECODE_LAUNCH_TABLE": str(bad)}).launch_table == str(bad)
    with pytest.raises(ConfigError, match="launch_table"):
        FusedOptions(launch_table="")


@given(fmt=st.sampled_from([FLOAT, INT8, INT4]), rows=st.integers(1, 400),
       k=st.sampled_from([64, 576, 2560, 12800]), group=st.sampled_from([32, 64, 128]),
       seg=st.integers(0, 400), norm=st.sampled_from([0, 1, 2]), glu=st.booleans(),
       asm=st.sampled_from([None, False]), int4=st.sampled_from([None, 0, 1, 2]),
       parts=st.sampled_from([None, 1, 2, 4]), sms=st.sampled_from([40, 108, 132]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), ws=st.booleans())
@settings(max_examples=200, deadline=None)
def test_heuristic_is_admissible(fmt, rows, k, group, seg, norm, glu, asm, int4, parts, sms,
                                 dtype, ws):
    """For any shape, segments, pins and SM count the fallback is a launch the kernel
    takes (what launch_gemv checks, and the format's block rules)."""
    n = 8 * rows
    nsplit = min(8 * seg, n)
    k = k if fmt != INT4 else group * max(1, k // group)  # int4: whole groups
    p = _meta(fmt, n, k, group)
    opts = _opts(asm=asm, int4=int4, parts=parts)
    w = tune.Workspace(n, "meta") if ws else None
    cfg = tune.heuristic(p, n, nsplit, dtype, opts, glu, w, sms, norm)
    assert tune.admissible(cfg, p, n, nsplit, dtype, opts, glu, w), cfg
    assert cfg[6] == 1 or (w is not None and w.fits(n, cfg[6], cfg[0]) and not glu)


def test_the_record_names_each_launch_and_its_source():
    """tune.chosen() (the bench record's 'launches'): per GEMV shape the configuration and
    where it came from."""
    _norm_then_gemv(INT8, 0, "plain", False, False, 1, 1, 32, 0)
    rec = tune.chosen()
    entry = rec["int8 8x64 g64 float32"]
    assert entry["from"] == ("heuristic" if CUDA else "interpreter")  # no table has it
    assert len(entry["cfg"]) == 7 and (entry["device"] == "cpu") != CUDA


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_fused_matches_eager_cuda(tiny_models, dtype):
    """--compile graphs with the fused kernels (tuned, captured) vs eager, 40 steps."""
    from fastdecode.compile import compile_decoder
    from fastdecode.models import load_model

    lm = load_model("small-neox", dtype=dtype, device="cuda")
    cfg = CacheConfig(policy="streaming", sink=4, window=48)
    prompt = torch.randint(0, lm.spec.vocab_size, (60,), device="cuda")
    ref, dec = Decoder.build(lm.model, cfg), Decoder.build(lm.model, cfg)
    a = ref.prefill(prompt)
    dec.prefill(prompt)
    step = compile_decoder(dec, "graphs", kernels="fused")
    assert step.kernels == "fused" and step.graph is not None
    tok = torch.argmax(a, -1, keepdim=True)
    kept = []
    for _ in range(40):
        a, b = ref.step(tok), dec.step(tok)
        kept.append((a, b))
        tok = torch.argmax(a, -1, keepdim=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in kept:  # also: nothing handed back was overwritten by later replays
        assert _rel(b.float(), a.float()) < tol
