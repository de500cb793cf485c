"""Weight-only quantization: storage round trips, error bounds, NaN-free fp16, checkpoints."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.errors import ConfigError
from fastdecode.models import load_model
from fastdecode.quant import QuantConfig, quantize_model
from fastdecode.quant.checkpoint import save_quantized
from fastdecode.quant.gptq import gptq_int4, input_moments, moment_batches
from fastdecode.quant.int4 import Int4Linear, dequantize_int4, quantize_int4, unpack_int4
from fastdecode.quant.int8 import Int8Linear, dequantize_int8, quantize_int8
from fastdecode.reference.streaming import dense_logits


@given(out_f=st.integers(1, 24), in_f=st.integers(1, 40), seed=st.integers(0, 2**16),
       mag=st.floats(1e-3, 1e3))
def test_int8_rounding_bound(out_f, in_f, seed, mag):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * mag
    q, scale = quantize_int8(w)
    err = (dequantize_int8(q, scale) - w).abs()
    assert q.dtype == torch.int8
    assert torch.all(err <= scale[:, None] * 0.5 + 1e-6 * mag)


@given(out_f=st.integers(1, 16), groups=st.integers(1, 3), g=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16), mag=st.floats(1e-3, 1e3))
def test_int4_rounding_bound_and_packing(out_f, groups, g, seed, mag):
    w = torch.randn(out_f, groups * g, generator=torch.Generator().manual_seed(seed)) * mag
    packed, scale, zero = quantize_int4(w, g, method="rtn")
    assert packed.dtype == torch.uint8 and packed.shape == (out_f, groups * g // 2)
    codes = unpack_int4(packed)
    assert int(codes.max()) <= 15
    err = (dequantize_int4(packed, scale, zero, g) - w).abs().reshape(out_f, groups, g)
    assert torch.all(err <= scale[..., None] * 0.5 + 1e-5 * mag)
    # the default (searched) fit is never worse than min-max rounding, group by group
    ps, ss, zs = quantize_int4(w, g)
    assert int(unpack_int4(ps).max()) <= 15
    mse = ((dequantize_int4(ps, ss, zs, g) - w) ** 2).reshape(out_f, groups, g).mean(-1)
    assert torch.all(mse <= (err ** 2).mean(-1) * (1 + 1e-4) + 1e-10 * mag * mag)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@given(seed=st.integers(0, 2**16), T=st.integers(1, 5), bias=st.booleans())
@settings(max_examples=10)
def test_quant_linear_equals_dequantized_reference(kind, seed, T, bias):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=gen))
    q = (Int8Linear.from_linear(lin) if kind == "int8"
         else Int4Linear.from_linear(lin, group_size=32))
    x = torch.randn(T, 64, generator=gen)
    ref = x.double() @ q.dequantized().double().T
    if bias:
        ref = ref + lin.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)


@given(in_f=st.integers(33, 200), g=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_int4_pads_widths_that_are_not_a_multiple_of_the_group(in_f, g, seed):
    """SmolLM2's 576 inputs with groups of 128: zero columns up to a whole group, which
    change no output; the rounding error stays that of the real columns' groups."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, 16, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, in_f, generator=gen))
    q = Int4Linear.from_linear(lin, group_size=g)
    assert q.padded_in % g == 0 and 0 <= q.padded_in - in_f < g
    assert q.weight.shape == (16, q.padded_in // 2)
    w = q.dequantized()
    assert w.shape == (16, in_f)
    # the fit ignores the padding: no worse than min-max rounding of the real columns
    p, s, z = quantize_int4(lin.weight.detach(), g, method="rtn")
    rtn = dequantize_int4(p, s, z, g)[:, :in_f]
    assert ((w - lin.weight) ** 2).sum() <= ((rtn - lin.weight) ** 2).sum() * (1 + 1e-4)
    x = torch.randn(3, in_f, generator=gen)
    ref = x.double() @ w.double().T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)


def _group_sq_err(w, packed, scale, zero, g):
    """Squared reconstruction error per group [out, groups] over the real columns."""
    d = dequantize_int4(packed, scale, zero, g)[:, :w.shape[1]] - w.float()
    d = torch.nn.functional.pad(d, (0, scale.shape[1] * g - w.shape[1]))
    return (d ** 2).reshape(w.shape[0], -1, g).sum(-1)


@given(out_f=st.integers(1, 12), in_f=st.integers(1, 200), g=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16), mag=st.floats(1e-3, 1e3), df=st.sampled_from([0, 2, 5]))
@settings(max_examples=30)
def test_int4_search_never_worse_than_rtn_per_group(out_f, in_f, g, seed, mag, df):
    """Gaussian (df 0) or Student-t weights, any width (padded groups included)."""
    torch.manual_seed(seed)
    w = (torch.randn(out_f, in_f) if not df else
         torch.distributions.StudentT(float(df)).sample((out_f, in_f))) * mag
    rtn = _group_sq_err(w, *quantize_int4(w, g, method="rtn"), g)
    packed, scale, zero = quantize_int4(w, g)
    assert int(unpack_int4(packed).max()) <= 15 and (scale > 0).all()
    assert (_group_sq_err(w, packed, scale, zero, g) <= rtn * (1 + 1e-5) + 1e-12 * mag**2).all()


@pytest.mark.parametrize("df", [2.0, 3.0])
def test_int4_search_beats_rtn_on_heavy_tails(df):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(df).sample((64, 256))
    rtn = _group_sq_err(w, *quantize_int4(w, 64, method="rtn"), 64).sum()
    search = _group_sq_err(w, *quantize_int4(w, 64), 64).sum()
    assert search < 0.9 * rtn  # measured 0.85 (df 2) and 0.87 (df 3)


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_int4_reproduces_weights_on_its_grid(g, method):
    """Weights already on a g-aligned asymmetric 4-bit grid (as a Q4_1 GGUF's are on g32)
    come back exactly, up to float rounding."""
    gen = torch.Generator().manual_seed(1)
    out_f, groups = 8, 3
    codes = torch.randint(0, 16, (out_f, groups, g), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its grid
    scale = torch.rand(out_f, groups, 1, generator=gen) * 0.01 + 1e-3
    lo = torch.randn(out_f, groups, 1, generator=gen) * 0.05
    w = (codes * scale + lo).reshape(out_f, groups * g)
    back = dequantize_int4(*quantize_int4(w, g, method=method), g)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_int4_degenerate_groups_stay_finite(dtype, method):
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0] = 0  # zero row
    w[1, :32] = 0.5  # constant group
    w[2, 32:64] = -3e-7  # a constant below fp16's normal range
    w[3] = 1e-6 * torch.randn(96)  # tiny weights
    w = w.to(dtype)
    packed, scale, zero = quantize_int4(w, 32, method=method)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all() and (scale > 0).all()
    assert int(unpack_int4(packed).max()) <= 15
    back = dequantize_int4(packed, scale, zero, 32)
    assert torch.isfinite(back).all() and (back[0] == 0).all()
    torch.testing.assert_close(back[1, :32], w[1, :32].float(), rtol=1e-2, atol=0)
    lin = torch.nn.Linear(96, 6, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = Int4Linear.from_linear(lin, group_size=32, method=method)
    assert mod.scale.dtype == dtype and torch.isfinite(mod(torch.randn(2, 96).to(dtype))).all()


def _correlated_inputs(n=2048, d=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)
    x = x + torch.randn(n, d, generator=gen)
    x[:, 5] *= 20  # an outlier channel
    return x


def test_gptq_beats_activation_weighted_search_on_output_error():
    x = _correlated_inputs()
    H = x.T @ x / x.shape[0]
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))

    def out_err(packed, scale, zero):
        d = dequantize_int4(packed, scale, zero, 32) - w
        return torch.einsum("oi,ij,oj->", d, H, d).item()

    packed, scale, zero = gptq_int4(w, H, 32)
    assert int(unpack_int4(packed).max()) <= 15 and (scale > 0).all()
    weighted = out_err(*quantize_int4(w, 32, importance=H.diagonal()))
    assert out_err(packed, scale, zero) < 0.8 * weighted  # measured 0.64
    assert weighted < out_err(*quantize_int4(w, 32, method="rtn"))


def test_gptq_padding_dead_inputs_and_half_precision():
    """in=80 with g=32 (16 padded columns), one input never active, bf16 storage."""
    x = _correlated_inputs(d=80)
    x[:, 7] = 0
    H = x.T @ x / x.shape[0]
    w = (torch.randn(16, 80, generator=torch.Generator().manual_seed(2)) * 0.02)
    w = w.to(torch.bfloat16)
    packed, scale, zero = gptq_int4(w, H, 32)
    assert packed.shape == (16, 48) and scale.shape == (16, 3)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # what the module stores
    back = dequantize_int4(packed, scale, zero, 32)[:, :80]
    assert torch.isfinite(back).all()
    assert ((back - w.float()).norm() / w.float().norm()).item() < 0.2


def test_input_moments_match_the_inputs():
    lm = load_model("tiny-llama")
    toks = torch.randint(0, lm.spec.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    names = ["layers.0.attn.qkv", "layers.0.mlp.up"]
    m = input_moments(lm.model, names, toks, seq_len=8)  # two sequences; the last 4 unused
    layer = lm.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.norm1(lm.model.embed(toks[s:s + 8])) for s in (0, 8)])
    torch.testing.assert_close(m["layers.0.attn.qkv"], x.T @ x / 16, rtol=1e-4, atol=1e-6)
    assert m["layers.0.mlp.up"].shape == (lm.spec.hidden_size,) * 2
    names = ["layers.0.mlp.up", "layers.0.mlp.down", "layers.1.mlp.up"]
    assert moment_batches(lm.model, names, budget=10**12) == [names]
    assert moment_batches(lm.model, names, budget=1) == [[n] for n in names]


def test_gptq_recipe_needs_calibration_and_names_itself():
    lm = load_model("tiny-llama")
    cfg = QuantConfig.parse("int4-mlp-g32-gptq")
    assert cfg.name == "int4-mlp-g32-gptq" and QuantConfig.parse(cfg.name) == cfg
    with pytest.raises(ConfigError):
        quantize_model(lm.model, cfg)
    toks = torch.randint(0, lm.spec.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
    ref = dense_logits(lm.model, toks[:12])
    names = quantize_model(lm.model, cfg, calibration=toks)
    assert names and all(isinstance(lm.model.get_submodule(n), Int4Linear) for n in names)
    out = dense_logits(lm.model, toks[:12])
    assert torch.isfinite(out).all() and 0 < ((out - ref).norm() / ref.norm()).item() < 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(seed=st.integers(0, 2**16), mag=st.floats(1.0, 300.0))
@settings(max_examples=10)
def test_int8_no_overflow_in_half_precision(dtype, seed, mag):
    # int8 "v1" (matmul on raw codes, scale afterwards) overflows fp16 here; ours must not.
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(2560, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 2560, generator=gen) * 0.02)
    q = Int8Linear.from_linear(lin.to(dtype))
    x = (torch.randn(2, 2560, generator=gen) * mag).abs().to(dtype)
    y = q(x)
    assert torch.isfinite(y).all()
    raw = x.float() @ q.weight.float().T  # what the unscaled matmul would have to hold
    if dtype == torch.float16 and raw.abs().max() > 65504:
        assert not torch.isfinite(raw.to(dtype)).all()  # the trap exists, and we avoided it


def test_recipe_parsing_and_filters():
    assert QuantConfig.parse("int4-mlp-g128") == QuantConfig("int4", "mlp", 128)
    assert QuantConfig.parse("int4-mlp-g128").name == "int4-mlp-g128-search"
    assert QuantConfig.parse("int4-g64-rtn+head") == QuantConfig("int4", "all", 64, True, "rtn")
    assert QuantConfig.parse("int8").name == "int8-all"
    assert QuantConfig.parse("int8-mlp_up+head").head
    cfg = QuantConfig.parse("int4-attn-g64")
    assert cfg.matches("layers.3.attn.qkv") and not cfg.matches("layers.3.mlp.up")
    assert not QuantConfig.parse("int8").matches("lm_head")
    for bad in ("int3", "int8-g128", "int4-mlp-g100", "int4-everything", "int8-gptq",
                "int4-mlp-g128-awq"):
        with pytest.raises(ConfigError):
            QuantConfig.parse(bad)


# Per-recipe bounds on the logit error against the unquantized model (small random NeoX,
# widths 256/512, normal(0, 0.02) weights: a hard case for int4, whose 16 levels span each
# group's range). Measured 0.011 (int8), 0.009 (int8-mlp), 0.089 (int4-mlp-g32), 0.141
# (int4-g128), 0.066 (int4-attn-g32); the bounds leave ~2x headroom. (pythia-160m gave
# about twice these errors, at 20x the CPU time.)
BOUNDS = {"int8": 0.022, "int8-mlp": 0.02, "int4-mlp-g32": 0.18, "int4-g128": 0.28,
          "int4-attn-g32": 0.13}
MODEL = "small-neox"
TOKENS = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_ref():
    return dense_logits(load_model(MODEL).model, TOKENS)


@pytest.mark.parametrize("recipe", sorted(BOUNDS))
def test_recipe_error_bound_on_model(recipe, model_ref):
    ref, toks = model_ref, TOKENS
    q = load_model(MODEL)
    names = quantize_model(q.model, QuantConfig.parse(recipe))
    assert names and all("lm_head" not in n for n in names)
    out = dense_logits(q.model, toks)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < BOUNDS[recipe]


@pytest.mark.parametrize("recipe", ["int8-mlp", "int4-g32", "int4-mlp-g32-gptq"])
def test_checkpoint_round_trip(tmp_path, recipe):
    lm = load_model("tiny-llama")
    cfg = QuantConfig.parse(recipe)
    calib = torch.randint(0, lm.spec.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
    quantize_model(lm.model, cfg, calibration=calib if cfg.method == "gptq" else None)
    save_quantized(lm, cfg, tmp_path / "q")
    back = load_model(str(tmp_path / "q"))
    assert back.quant == cfg
    toks = torch.arange(12) % lm.spec.vocab_size
    torch.testing.assert_close(dense_logits(back.model, toks), dense_logits(lm.model, toks),
                               rtol=0, atol=0)


def test_checkpoint_without_a_method_reads_as_rtn(tmp_path):
    """Checkpoints written before QuantConfig had a method were min-max quantized."""
    lm = load_model("tiny-llama")
    cfg = QuantConfig.parse("int4-g32-rtn")
    quantize_model(lm.model, cfg)
    save_quantized(lm, cfg, tmp_path / "q")
    meta_path = tmp_path / "q" / "fastdecode.json"
    meta = json.loads(meta_path.read_text())
    del meta["quant"]["method"]
    meta_path.write_text(json.dumps(meta))
    assert load_model(str(tmp_path / "q")).quant == cfg


def test_int8_inductor_formulation_equals_reference():
    """The scale-after-matmul form (bf16 only) computes the same function as the reference."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=gen) * 0.02)
    mod = Int8Linear.from_linear(lin.to(torch.bfloat16))
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    ref = x.double() @ mod.dequantized().double().T + mod.bias.double()
    mod.set_backend("inductor")
    rel = ((mod(x).double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2
    with pytest.raises(ConfigError):
        mod.set_backend("cublas")
