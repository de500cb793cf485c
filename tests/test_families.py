"""Model families (``fastdecode.models.families``): every registered family round-trips
its config mapping, and a family defined here, in the test, loads through the normal path
(a config.json + safetensors directory and ``load_model``) and computes what its
switches say, checked against a forward pass written out in plain torch."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdecode.cache import CacheConfig
from fastdecode.engine import Decoder
from fastdecode.errors import ModelLoadError
from fastdecode.models import families as fam_mod
from fastdecode.models import load_model
from fastdecode.models.families import FAMILIES, MLPS, NORMS, Family
from fastdecode.models.presets import SHAPE_PRESETS
from fastdecode.models.spec import ModelSpec
from fastdecode.models.transformer import RMSNorm
from fastdecode.models.weights import random_state
from fastdecode.reference.streaming import _rotate

SRC = Path(__file__).resolve().parents[1] / "src" / "fastdecode"


# ------------------------------------------------------------------ registered families
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_switches_and_config_round_trip(name):
    fam = FAMILIES[name]
    assert fam.name == name and fam_mod.get(name) is fam
    assert fam.norm in NORMS and fam.mlp in MLPS
    assert isinstance(fam.parallel_residual, bool) and isinstance(fam.bias, bool)
    specs = [f() for f in SHAPE_PRESETS.values() if f().family == name]
    assert specs, f"no shape preset of family {name}"
    for spec in specs:
        assert (spec.norm, spec.mlp, spec.parallel_residual, spec.has_bias) == \
            (fam.norm, fam.mlp, fam.parallel_residual, fam.bias)
        cfg = fam.hf_config(spec)
        assert cfg["model_type"] == name
        assert ModelSpec.from_hf_config(json.loads(json.dumps(cfg))) == spec


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_config_is_what_transformers_builds(name):
    """The config mapping describes transformers' architecture: the same parameter count
    as our decoder (biases, gate rows, tied head included) on a tiny preset."""
    transformers = pytest.importorskip("transformers")
    spec = next(f() for f in SHAPE_PRESETS.values() if f().family == name
                and f().hidden_size <= 64)
    cfg = fam_mod.get(name).hf_config(spec)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    ours = load_model(next(k for k, f in SHAPE_PRESETS.items() if f() == spec)).model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (shared tied)
    assert count(hf) == count(ours)


def test_unknown_families_list_the_registry():
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported "
                                             r"\(supported: " + ", ".join(FAMILIES)):
        ModelSpec.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gptneox' is not supported"):
        fam_mod.for_gguf("gptneox")
    with pytest.raises(ModelLoadError, match="family 'toy' is not one of"):
        replace(SHAPE_PRESETS["tiny-neox"](), family="toy").validate()


def test_no_module_compares_family_names():
    """Outside models/families the family is read through its switches, never by name."""
    pattern = re.compile(r"""family\s*[!=]=|[!=]=\s*["'](gpt_neox|llama)["']""")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
                 if "families" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


# ------------------------------------------------------------ a third family, in a test
class Toy(Family):
    """RMSNorm + SiLU-gated MLP + parallel residual, no biases, untied head: a mix that
    neither registered family has, with its own config keys and tensor names."""

    name = "toy"
    norm = "rms"
    mlp = "glu"
    parallel_residual = True
    bias = False

    def spec_fields(self, cfg):
        return dict(vocab_size=cfg["vocab"], hidden_size=cfg["dim"], num_layers=cfg["layers"],
                    num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"],
                    intermediate_size=cfg["ffn"], rotary_dim=cfg["rotary_dim"],
                    rope_theta=float(cfg["theta"]), norm_eps=float(cfg["eps"]),
                    max_position=cfg.get("context", 2048), tie_embeddings=False)

    def hf_config(self, spec):
        return dict(model_type=self.name, vocab=spec.vocab_size, dim=spec.hidden_size,
                    layers=spec.num_layers, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                    ffn=spec.intermediate_size, rotary_dim=spec.rotary_dim,
                    theta=spec.rope_theta, eps=spec.norm_eps, context=spec.max_position)

    def hf_to_canonical(self, spec, hf):
        out = {"embed.weight": hf["tok.weight"], "norm.weight": hf["final.weight"],
               "lm_head.weight": hf["head.weight"]}
        for i in range(spec.num_layers):
            p, o = f"h.{i}.", f"layers.{i}."
            out[o + "norm1.weight"] = hf[p + "n1.weight"]
            out[o + "norm2.weight"] = hf[p + "n2.weight"]
            out[o + "attn.qkv.weight"] = torch.cat([hf[p + n + ".weight"] for n in "qkv"])
            out[o + "attn.out.weight"] = hf[p + "o.weight"]
            out[o + "mlp.up.weight"] = torch.cat([hf[p + "gate.weight"], hf[p + "up.weight"]])
            out[o + "mlp.down.weight"] = hf[p + "down.weight"]
        return out


TOY_CONFIG = dict(model_type="toy", vocab=53, dim=32, layers=2, heads=4, kv_heads=2, ffn=48,
                  rotary_dim=4, theta=500.0, eps=1e-6)


def toy_checkpoint(seed: int = 0) -> dict:
    """Random tensors under the toy family's own names (norm weights near 1)."""
    c = TOY_CONFIG
    D = c["dim"] // c["heads"]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=gen)  # noqa: E731
    w = {"tok.weight": r(c["vocab"], c["dim"]), "final.weight": 1 + r(c["dim"]),
         "head.weight": r(c["vocab"], c["dim"])}
    for i in range(c["layers"]):
        p = f"h.{i}."
        w |= {p + "n1.weight": 1 + r(c["dim"]), p + "n2.weight": 1 + r(c["dim"]),
              p + "q.weight": r(c["heads"] * D, c["dim"]),
              p + "k.weight": r(c["kv_heads"] * D, c["dim"]),
              p + "v.weight": r(c["kv_heads"] * D, c["dim"]),
              p + "o.weight": r(c["dim"], c["heads"] * D),
              p + "gate.weight": r(c["ffn"], c["dim"]), p + "up.weight": r(c["ffn"], c["dim"]),
              p + "down.weight": r(c["dim"], c["ffn"])}
    return w


def toy_forward(w: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The toy architecture written out: logits [T, V], causal attention at 0..T-1."""
    c = TOY_CONFIG
    nh, nkv, D, T = c["heads"], c["kv_heads"], c["dim"] // c["heads"], len(tokens)
    pos = torch.arange(T)

    def rms(x, g):
        return g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["eps"])

    x = w["tok.weight"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["layers"]):
        p = f"h.{i}."
        h = rms(x, w[p + "n1.weight"])
        q = (h @ w[p + "q.weight"].T).view(T, nh, D).transpose(0, 1)
        k = (h @ w[p + "k.weight"].T).view(T, nkv, D).transpose(0, 1)
        v = (h @ w[p + "v.weight"].T).view(T, nkv, D).transpose(0, 1)
        q, k = (_rotate(t, pos, c["rotary_dim"], c["theta"]) for t in (q, k))
        k, v = (t.repeat_interleave(nh // nkv, 0) for t in (k, v))
        s = (q @ k.transpose(1, 2)) / D ** 0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
        attn = a.transpose(0, 1).reshape(T, nh * D) @ w[p + "o.weight"].T
        h2 = rms(x, w[p + "n2.weight"])
        mlp = (F.silu(h2 @ w[p + "gate.weight"].T) * (h2 @ w[p + "up.weight"].T)) \
            @ w[p + "down.weight"].T
        x = x + attn + mlp  # parallel residual
    return rms(x, w["final.weight"]) @ w["head.weight"].T


@pytest.fixture
def toy_family(monkeypatch):
    toy = Toy()
    monkeypatch.setitem(FAMILIES, "toy", toy)
    return toy


def test_a_registered_family_loads_through_the_normal_path(toy_family, tmp_path):
    from safetensors.torch import save_file

    w = toy_checkpoint()
    (tmp_path / "config.json").write_text(json.dumps(TOY_CONFIG))
    save_file(w, str(tmp_path / "model.safetensors"))
    lm = load_model(str(tmp_path))
    assert lm.spec.family == "toy" and lm.spec.arch is toy_family
    assert ModelSpec.from_hf_config(toy_family.hf_config(lm.spec)) == lm.spec
    layer = lm.model.layers[0]
    assert isinstance(layer.norm1, RMSNorm) and isinstance(lm.model.norm, RMSNorm)
    assert layer.mlp.gated and layer.parallel
    assert all(not name.endswith(".bias") for name, _ in lm.model.named_parameters())

    tokens = torch.randint(0, TOY_CONFIG["vocab"], (12,),
                           generator=torch.Generator().manual_seed(1))
    ref = toy_forward(w, tokens)
    assert ref.std(-1).min() > 0.3  # logits that tell positions and tokens apart
    dec = Decoder.build(lm.model, CacheConfig(policy="dense", max_len=12), chunk_size=5)
    ours = torch.cat([dec.prefill(tokens[:8], all_logits=True),
                      torch.stack([dec.step(int(t)) for t in tokens[8:]])])
    err = float((ours.double() - ref.double()).norm() / ref.double().norm())
    assert err < 1e-5, err
    # The check is discriminating: the same weights read as a sequential residual differ.
    for blk in lm.model.layers:
        blk.parallel = False
    seq = Decoder.build(lm.model, CacheConfig(policy="dense", max_len=12)).prefill(
        tokens, all_logits=True)
    assert float((seq.double() - ref.double()).norm() / ref.double().norm()) > 1e-2

    # Random weights of its shapes too (the speed-run path).
    state = random_state(lm.spec, seed=3)
    assert state["layers.0.mlp.up.weight"].shape == (2 * TOY_CONFIG["ffn"], TOY_CONFIG["dim"])


def test_a_family_without_gguf_says_so(toy_family):
    with pytest.raises(ModelLoadError, match="reading toy models from GGUF is not supported"):
        toy_family.gguf_spec_fields(lambda *a, **k: None, set())
