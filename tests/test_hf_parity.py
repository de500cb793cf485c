"""Parity with Hugging Face transformers: the loaders and the decoder reproduce its logits.

Tiny random GPTNeoXForCausalLM (partial rotary, parallel residual, untied head, biases) and
LlamaForCausalLM (grouped-query attention, tied head, non-default rope_theta) are saved as
safetensors and as pytorch_model.bin, and with today's and older config.json keys; each is
loaded by path and must give transformers' logits through the slow oracle
(``dense_logits``) and through the fast path (chunked prefill + decode steps). The bundled
SmolLM2-135M GGUF is the one real-model check.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdecode.cache import CacheConfig
from fastdecode.engine import Decoder
from fastdecode.models import load_model
from fastdecode.reference.streaming import dense_logits

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # relative; fp32 everywhere, the implementations differ only in rounding
N_TOKENS, N_PREFILL, CHUNK = 24, 15, 4


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    a, b = ours.double(), ref.double()
    norm_err = float((a - b).norm() / b.norm())
    max_err = float((a - b).abs().max() / b.abs().max())
    assert norm_err <= tol and max_err <= tol, (
        f"{what}: relative error {norm_err:.3g} (norm), {max_err:.3g} (max abs) > {tol}")


def fast_logits(model, tokens: torch.Tensor, n_prefill: int, chunk: int) -> torch.Tensor:
    """Dense cache: chunked prefill of the first ``n_prefill`` tokens, then decode steps."""
    dec = Decoder.build(model, CacheConfig(policy="dense", max_len=len(tokens)),
                        chunk_size=chunk)
    first = dec.prefill(tokens[:n_prefill], all_logits=True)
    rest = [dec.step(int(t)) for t in tokens[n_prefill:]]
    return torch.cat([first, torch.stack(rest)]) if rest else first


def randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Every parameter random (biases and norm weights too, so a misplaced one shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def hf_neox():
    cfg = transformers.GPTNeoXConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rotary_pct=0.25, rotary_emb_base=5000,
        use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=256,
        layer_norm_eps=1e-5, hidden_act="gelu")
    model = transformers.GPTNeoXForCausalLM(cfg).float().eval()
    randomize(model, seed=1, std=0.15)
    return model


def hf_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rope_theta=50000.0,
        tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    randomize(model, seed=2, std=0.15)
    return model


# What the loader must read from each config (partial rotary: 16 * 0.25 = 4 dims).
EXPECTED_SPEC = {
    "neox": dict(family="gpt_neox", num_heads=4, num_kv_heads=4, head_dim=16, rotary_dim=4,
                 rope_theta=5000.0, tie_embeddings=False, parallel_residual=True),
    "llama": dict(family="llama", num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=16,
                  rope_theta=50000.0, tie_embeddings=True, parallel_residual=False),
}


def legacy_config(family: str, cfg: dict) -> dict:
    """The same config as older transformers wrote it (and as Pythia's config.json is):
    rotary keys at the top level instead of ``rope_parameters``."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    if family == "neox":
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
    else:
        cfg["rope_theta"] = rope["rope_theta"]
    return cfg


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    return {"neox": hf_neox(), "llama": hf_llama()}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (N_TOKENS,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_logits(hf_models, tokens):
    with torch.no_grad():
        out = {k: m(tokens[None]).logits[0].float() for k, m in hf_models.items()}
    for k, logits in out.items():
        # Non-trivial: logits vary by O(1) across the vocabulary and across positions, so
        # a relative tolerance of 1e-4 is a real constraint.
        assert logits.std(-1).min() > 0.3, k
        assert (logits[1:] - logits[:-1]).abs().max() > 0.5, k
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "legacy-config"])
@pytest.mark.parametrize("family", ["neox", "llama"])
def test_hf_dir_matches_transformers(hf_models, hf_logits, tokens, tmp_path, family, fmt):
    hf = hf_models[family]
    hf.save_pretrained(tmp_path)
    if fmt == "bin":
        # transformers 5 writes safetensors only; a .bin checkpoint (as Pythia's) is the
        # same checkpoint-named tensors in a torch.save'd dict.
        from safetensors.torch import load_file

        (st_file,) = tmp_path.glob("*.safetensors")
        torch.save(load_file(str(st_file)), tmp_path / "pytorch_model.bin")
        st_file.unlink()
        assert not list(tmp_path.glob("*.safetensors"))
    elif fmt == "legacy-config":
        cfg_file = tmp_path / "config.json"
        cfg_file.write_text(json.dumps(legacy_config(family, json.loads(cfg_file.read_text()))))
    assert list(tmp_path.glob("*.safetensors" if fmt != "bin" else "*.bin"))

    lm = load_model(str(tmp_path))
    for key, value in EXPECTED_SPEC[family].items():
        assert getattr(lm.spec, key) == value, key
    assert lm.tokenizer is None  # none saved
    if family == "llama":
        assert lm.model.lm_head.weight is lm.model.embed.weight

    ref = hf_logits[family]
    assert_logits_match(dense_logits(lm.model, tokens), ref, f"{family}/{fmt} dense_logits")
    assert_logits_match(fast_logits(lm.model, tokens, N_PREFILL, CHUNK), ref,
                        f"{family}/{fmt} prefill+decode")


@pytest.mark.parametrize(("family", "key", "value"), [
    ("llama", "rope_theta", 10000.0), ("neox", "rope_theta", 10000.0),
    ("neox", "partial_rotary_factor", 0.5)])
def test_parity_check_detects_a_wrong_model(hf_models, hf_logits, tokens, tmp_path, family,
                                            key, value):
    """The comparison above can fail: loading with the default rotary base (a loader that
    ignored the config's) or twice the rotary dims misses the tolerance by far."""
    hf_models[family].save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["rope_parameters"][key] != value
    cfg["rope_parameters"][key] = value
    cfg_file.write_text(json.dumps(cfg))
    ours = dense_logits(load_model(str(tmp_path)).model, tokens).double()
    ref = hf_logits[family].double()
    assert float((ours - ref).norm() / ref.norm()) > 10 * TOL


TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines\n\n",
         "Ünïcödé — naïve café, 東京, emoji 🙂, Ωμέγα", "def f(x):\n    return x ** 2  # 42"]


def test_saved_tokenizer_json_round_trips(hf_models, tmp_path):
    """A tokenizer.json next to the weights is loaded, encodes as transformers does, and
    decodes back to the text."""
    from fastdecode.models.presets import NEOX_TOKENIZER

    hf_models["neox"].save_pretrained(tmp_path)
    shutil.copyfile(NEOX_TOKENIZER, tmp_path / "tokenizer.json")
    lm = load_model(str(tmp_path))
    assert lm.tokenizer is not None
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        ids = lm.tokenizer.encode(text)
        assert ids and ids == hf_tok.encode(text, add_special_tokens=False), text
        assert lm.tokenizer.decode(ids) == text


# ------------------------------------------------------------------ the one real model
def test_smollm2_gguf_matches_transformers():
    """The bundled SmolLM2-135M (GGUF, Q4_1-dequantized): our loader + decoder vs
    transformers' own GGUF loader, on a short prompt; tokenizers agree too."""
    from fastdecode.models.weights import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except Exception as e:  # the package is missing: nothing to compare
        pytest.skip(str(e))
    pytest.importorskip("gguf")
    lm = load_model("smollm2-135m")
    prompt = "The capital of France is Paris. Attention sinks keep streaming"
    ids = lm.tokenizer.encode(prompt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ids == hf_tok.encode(prompt, add_special_tokens=False)
    assert lm.tokenizer.decode(ids) == prompt

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.tensor(ids)
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0].float()
    del hf
    assert ref.std(-1).min() > 1.0  # a trained model: peaked, position-dependent logits
    assert_logits_match(dense_logits(lm.model, tokens), ref, "smollm2 dense_logits")
    n_prefill = len(ids) - 3
    assert_logits_match(fast_logits(lm.model, tokens, n_prefill, chunk=5), ref,
                        "smollm2 prefill+decode")
