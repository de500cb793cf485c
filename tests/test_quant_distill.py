"""int4 distillation (``-kd``): the trainable view equals the stored module, training
lowers the KL to the teacher, and nothing but the int4 codes, scales and zeros changes."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdecode.eval.calibration import calibration_tokens
from fastdecode.models import load_model
from fastdecode.models.presets import NEOX_TOKENIZER
from fastdecode.models.tokenizer import Tokenizer
from fastdecode.quant import QuantConfig, quantize_model
from fastdecode.quant.distill import _student, _Trainable, distill_int4, kl_to_teacher
from fastdecode.quant.int4 import Int4Linear, unpack_int4


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), in_f=st.integers(1, 80), g=st.sampled_from([32, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_trainable_view_equals_the_module_and_stores_it_back(seed, in_f, g, dtype):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, 12, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, in_f, generator=gen))
        lin.bias.copy_(torch.randn(12, generator=gen))
    m = Int4Linear.from_linear(lin.to(dtype), group_size=g)
    t = _Trainable(m)
    x = torch.randn(3, in_f, generator=gen)
    want = torch.nn.functional.linear(x, m.dequantized().float(), m.bias.float())
    torch.testing.assert_close(t(x), want, rtol=1e-6, atol=1e-5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert t.store(m) == 0  # untrained: the same codes, scales and zeros, bit for bit
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # offsets past +-0.5 move codes by one level, within 0..15
        t.offset.copy_(torch.randn(t.offset.shape, generator=gen).clamp(-1, 1))
        t.scale.mul_(1.01)
    moved = t.store(m)
    codes = unpack_int4(m.weight).int() - unpack_int4(before["weight"]).int()
    assert moved == int((codes != 0).sum()) and codes.abs().max() <= 1
    assert int(unpack_int4(m.weight).max()) <= 15 and m.scale.dtype == dtype


def test_the_student_sees_scales_as_the_model_stores_them():
    lm = load_model("tiny-llama", dtype=torch.bfloat16)
    quantize_model(lm.model, QuantConfig.parse("int4-mlp-g32"))
    names = [n for n, m in lm.model.named_modules() if isinstance(m, Int4Linear)]
    student, trainable = _student(lm.model, names)
    toks = torch.arange(40).view(2, 20) % lm.spec.vocab_size
    with torch.no_grad():
        ref = lm.model.float().forward_batch(toks)  # the stored numbers, in float32
        torch.testing.assert_close(student.forward_batch(toks), ref, rtol=1e-5, atol=1e-5)
        for t in trainable.values():  # less than half a bf16 step: rounds back
            t.scale.mul_(1 + 2**-10)
            t.zero.mul_(1 + 2**-10)
        torch.testing.assert_close(student.forward_batch(toks), ref, rtol=1e-5, atol=1e-5)
        for t in trainable.values():
            t.scale.mul_(1.02)
        assert not torch.allclose(student.forward_batch(toks), ref, rtol=1e-5, atol=1e-5)


def _kl(student, teacher, toks):
    with torch.no_grad():
        return kl_to_teacher(student.forward_batch(toks), teacher.forward_batch(toks)).item()


@pytest.mark.parametrize("family", ["tiny-neox", "tiny-llama"])
def test_distillation_lowers_the_kl_and_touches_only_int4(family):
    lm = load_model(family)
    toks = torch.randint(0, lm.spec.vocab_size, (2048,), generator=torch.Generator().manual_seed(0))
    teacher = copy.deepcopy(lm.model)
    quantize_model(lm.model, QuantConfig.parse("int4-mlp-g32-gptq"), calibration=toks)
    gptq = copy.deepcopy(lm.model)
    seqs = toks.view(-1, 128)
    info = distill_int4(lm.model, teacher, toks, seq=128, batch=4, epochs=6, lr_codes=0.1)
    assert _kl(lm.model, teacher, seqs) < 0.9 * _kl(gptq, teacher, seqs)
    assert info["steps"] == 24 and info["codes_moved"] > 0
    assert info["kl_last_epoch"] < info["kl_first_epoch"]
    after, start = lm.model.state_dict(), gptq.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed and all(k.split(".")[-1] in ("weight", "scale", "zero") and ".mlp." in k
                           for k in changed)
    for k in changed:
        if k.endswith(".weight"):  # int4 codes: one level at most
            step = unpack_int4(after[k]).int() - unpack_int4(start[k]).int()
            assert step.abs().max() <= 1
        else:
            assert torch.isfinite(after[k]).all()
    assert torch.equal(teacher.embed.weight, lm.model.embed.weight)


def test_kd_recipe_runs_gptq_then_distillation():
    cfg = QuantConfig.parse("int4-mlp-g32-kd")
    assert cfg.name == "int4-mlp-g32-kd" and cfg.calibrates
    assert not QuantConfig.parse("int4-mlp-g32").calibrates
    lm, ref = load_model("tiny-llama"), load_model("tiny-llama")
    toks = torch.randint(0, lm.spec.vocab_size, (1024,), generator=torch.Generator().manual_seed(3))
    quantize_model(lm.model, cfg, calibration=toks)
    quantize_model(ref.model, QuantConfig.parse("int4-mlp-g32-gptq"), calibration=toks)
    # GPTQ first (same moments: the first CALIB_TOKENS), then distillation moved something
    diff = [n for n, m in lm.model.named_modules() if isinstance(m, Int4Linear)
            and not torch.equal(m.scale, ref.model.get_submodule(n).scale)]
    assert diff


def test_calibration_tokens_put_gptqs_share_first():
    tok = Tokenizer.from_file(NEOX_TOKENIZER)
    from fastdecode.eval.data import load_text, tokenize

    wiki = tokenize(load_text("wikitext-2"), tok)[:100]
    book = tokenize(load_text("pg19-10321"), tok)[:50]
    got = calibration_tokens(tok, n_tokens=64, totals=(100, 50)).tolist()
    assert got == wiki[:32] + book[:32] + wiki[32:] + book[32:]
    assert calibration_tokens(tok, n_tokens=64).tolist() == wiki[:32] + book[:32]
    with pytest.raises(Exception, match="at least 32"):
        calibration_tokens(tok, n_tokens=64, totals=(100, 10))


def test_calibrating_recipes_need_a_tokenizer_and_sane_settings():
    from fastdecode.errors import ConfigError
    from fastdecode.eval.calibration import calibration_for

    lm = load_model("tiny-llama")  # random weights: no tokenizer
    for recipe in ("int4-mlp-g32-kd", "int4-mlp-g32-gptq"):
        with pytest.raises(ConfigError, match="needs the model's tokenizer"):
            calibration_for(lm, QuantConfig.parse(recipe))
    assert calibration_for(lm, QuantConfig.parse("int4-mlp-g32")) is None
    toks = torch.randint(0, lm.spec.vocab_size, (256,), generator=torch.Generator().manual_seed(0))
    quantize_model(lm.model, QuantConfig.parse("int4-mlp-g32"))
    teacher = load_model("tiny-llama").model
    with pytest.raises(ConfigError, match="at least 512 calibration tokens"):
        distill_int4(lm.model, teacher, toks)
    with pytest.raises(ConfigError, match="epochs >= 1"):
        distill_int4(lm.model, teacher, toks, seq=64, epochs=0)
    with pytest.raises(ConfigError, match="no int4 linears"):
        distill_int4(teacher, teacher, toks, seq=64)
