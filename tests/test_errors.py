"""Bad input gets a FastdecodeError naming the problem; the CLI turns it into exit status 2
and one ``error:`` line on stderr, never a traceback."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fastdecode.cache import CacheConfig
from fastdecode.cli import main
from fastdecode.config import parse_dtype
from fastdecode.engine import Decoder
from fastdecode.errors import (
    ConfigError,
    DeviceError,
    FastdecodeError,
    InputError,
    ModelLoadError,
)
from fastdecode.models import load_model, resolve_device

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------- bad model files
def neox_config() -> dict:
    return {"model_type": "gpt_neox", "vocab_size": 101, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
            "tie_word_embeddings": False, "layer_norm_eps": 1e-5}


def neox_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    """A complete GPT-NeoX checkpoint for ``cfg`` (checkpoint names, random values)."""
    H, V, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    out = {"gpt_neox.embed_in.weight": r(V, H), "embed_out.weight": r(V, H),
           "gpt_neox.final_layer_norm.weight": torch.ones(H),
           "gpt_neox.final_layer_norm.bias": torch.zeros(H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        for name, shape in (("input_layernorm", (H,)), ("post_attention_layernorm", (H,)),
                            ("attention.query_key_value", (3 * H, H)),
                            ("attention.dense", (H, H)), ("mlp.dense_h_to_4h", (inter, H)),
                            ("mlp.dense_4h_to_h", (H, inter))):
            out[p + name + ".weight"] = r(*shape) if len(shape) == 2 else torch.ones(shape)
            out[p + name + ".bias"] = r(shape[0])
    return out


def write_hf_dir(path, cfg: dict | None = None, drop: str | None = None,
                 tokenizer: bool = False):
    from safetensors.torch import save_file

    cfg = cfg or neox_config()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = neox_tensors(cfg)
    if drop:
        del tensors[drop]
    save_file(tensors, str(path / "model.safetensors"))
    if tokenizer:
        import shutil

        from fastdecode.models.presets import NEOX_TOKENIZER

        shutil.copyfile(NEOX_TOKENIZER, path / "tokenizer.json")
    return path


GGUF_METADATA = dict(vocab_size=11, embedding_length=8, block_count=1, head_count=2,
                     head_count_kv=2, feed_forward_length=16)


def write_gguf(path, arch: str = "llama", metadata: set[str] | None = frozenset()):
    """A small GGUF file: header, the model metadata except the keys in ``metadata``
    (None: no metadata at all), one tensor; not a usable model."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    if metadata is not None:
        for key, value in GGUF_METADATA.items():
            if key not in metadata:
                getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((11, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _model_path(kind: str, tmp_path) -> str:
    """Paths to bad models, by kind; each with the message substring it must produce."""
    if kind == "unknown-name":
        return "pythia-28b"
    if kind == "missing-dir":
        return str(tmp_path / "no" / "such" / "model")
    if kind == "missing-gguf":
        return str(tmp_path / "absent.gguf")
    d = tmp_path / "model"
    d.mkdir()
    if kind == "no-config":
        (d / "model.safetensors").write_bytes(b"")
    elif kind == "bad-json":
        (d / "config.json").write_text('{"model_type": "gpt_neox",')
    elif kind == "unsupported-type":
        (d / "config.json").write_text(json.dumps({**neox_config(), "model_type": "gpt2"}))
    elif kind == "config-missing-key":
        cfg = neox_config()
        del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "no-weights":
        (d / "config.json").write_text(json.dumps(neox_config()))
    elif kind == "missing-tensor":
        write_hf_dir(d, drop="gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
    elif kind == "wrong-shape":
        write_hf_dir(d)  # tensors for intermediate_size 64, config says 48
        (d / "config.json").write_text(json.dumps({**neox_config(), "intermediate_size": 48}))
    elif kind == "corrupt-safetensors":
        (d / "config.json").write_text(json.dumps(neox_config()))
        (d / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    elif kind == "not-gguf":
        f = tmp_path / "model.gguf"
        f.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file" * 4)
        return str(f)
    elif kind == "plain-file":
        f = tmp_path / "weights.txt"
        f.write_text("hello")
        return str(f)
    elif kind == "gguf-wrong-arch":
        return str(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    elif kind == "gguf-missing-metadata":
        return str(write_gguf(tmp_path / "bare.gguf", metadata=None))
    elif kind == "gguf-missing-head-count":
        return str(write_gguf(tmp_path / "nohead.gguf", metadata={"head_count"}))
    elif kind == "gguf-missing-tensor":
        return str(write_gguf(tmp_path / "partial.gguf"))
    else:
        raise AssertionError(kind)
    return str(d)


BAD_MODELS = {  # kind: substrings the message must contain ("{path}": the path given)
    "unknown-name": ["unknown model 'pythia-28b'", "pythia-2.8b"],
    "missing-dir": ["{path}", "does not exist"],
    "missing-gguf": ["{path}", "does not exist"],
    "no-config": ["{path}", "no config.json"],
    "bad-json": ["config.json", "not valid JSON"],
    "unsupported-type": ["model_type 'gpt2'", "not supported", "gpt_neox", "llama"],
    "config-missing-key": ["config.json", "'hidden_size'"],
    "no-weights": ["{path}", "no *.safetensors or pytorch_model*.bin"],
    "missing-tensor": ["lacks tensor", "'gpt_neox.layers.1.mlp.dense_4h_to_h.weight'"],
    "wrong-shape": ["layers.0.mlp.up.weight", "shape (64, 32)", "expects (48, 32)"],
    "corrupt-safetensors": ["model.safetensors"],
    "not-gguf": ["{path}", "not a readable GGUF"],
    "plain-file": ["{path}", "neither a model directory nor a .gguf file"],
    "gguf-wrong-arch": ["architecture 'gpt2'", "not supported"],
    "gguf-missing-metadata": ["{path}", "GGUF metadata lacks 'llama.vocab_size'"],
    "gguf-missing-head-count": ["{path}", "GGUF metadata lacks 'llama.attention.head_count'"],
    "gguf-missing-tensor": ["{path}", "lacks tensor 'output_norm.weight'"],
}


def _expect(kind: str, path: str) -> list[str]:
    return [s.replace("{path}", path) for s in BAD_MODELS[kind]]


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_bad_model_raises_model_load_error(kind, tmp_path):
    path = _model_path(kind, tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg
    for part in _expect(kind, path):
        assert part in msg, (part, msg)


# ------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize(("kwargs", "expect"), [
    (dict(policy="streaming", sink=-1), "sink must be >= 0, got -1"),
    (dict(policy="streaming", window=0), "window must be >= 1, got 0"),
    (dict(policy="window", sink=0, window=-3), "window must be >= 1, got -3"),
    (dict(policy="streaming", compress_every=0), "compress_every must be >= 1, got 0"),
    (dict(policy="dense", max_len=0), "max_len must be >= 1, got 0"),
    (dict(policy="nope"), "cache policy 'nope' is not one of"),
    (dict(position_mode="relative"), "position mode 'relative' is not one of"),
    (dict(kv_dtype="int4"), "kv_dtype 'int4' is not one of"),
    (dict(policy="window", sink=4), "the window policy keeps no sinks"),
    (dict(window=2.5), "window must be an integer, got 2.5"),
])
def test_bad_cache_config(kwargs, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("name", ["float8", "int8", "fp64", ""])
def test_unknown_dtype(name):
    with pytest.raises(ConfigError) as info:
        parse_dtype(name)
    assert f"dtype {name!r} is not one of" in str(info.value)
    assert "bfloat16" in str(info.value)  # names what would work


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device(device)
    with pytest.raises(DeviceError, match="'cuda' was asked for"):
        load_model("tiny-neox", device="cuda")


def test_bad_device_string():
    with pytest.raises(DeviceError, match="'gpu0' is not a valid torch device"):
        resolve_device("gpu0")


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-neox")


@pytest.mark.parametrize("empty", [[], (), torch.empty(0, dtype=torch.long)],
                         ids=["list", "tuple", "tensor"])
def test_empty_prompt(tiny, empty):
    dec = Decoder.build(tiny.model, CacheConfig(policy="streaming", sink=2, window=8))
    with pytest.raises(InputError, match="empty prompt"):
        dec.prefill(empty)
    assert dec.t == 0


def test_token_id_out_of_range(tiny):
    """An id outside the vocabulary (a tokenizer that is not the model's) is refused with
    the id and the vocabulary size, not an IndexError (a device-side assert on CUDA)."""
    dec = Decoder.build(tiny.model, CacheConfig(policy="streaming", sink=2, window=8))
    for bad, ids in ((97, [1, 97, 3]), (-1, [-1, 5]), (5000, torch.tensor([[5000]]))):
        with pytest.raises(InputError, match=rf"token id {bad} is out of range .*\(0\.\.96\)"):
            dec.prefill(ids)
    assert dec.t == 0
    dec.prefill([96, 0])
    with pytest.raises(InputError, match="token id 97 is out of range"):
        dec.step(97)
    assert dec.t == 2


def test_dense_cache_overflow(tiny):
    """Feeding a full dense cache is refused, before anything is written: the decoder
    stays usable at the same position."""
    dec = Decoder.build(tiny.model, CacheConfig(policy="dense", max_len=6), chunk_size=2)
    with pytest.raises(InputError, match="dense cache holds 6 tokens; feeding 7"):
        dec.prefill(list(range(7)))
    assert dec.t == 0
    dec.prefill(list(range(5)))
    dec.step(5)
    with pytest.raises(InputError, match="dense cache holds 6 tokens; feeding 7"):
        dec.step(6)
    with pytest.raises(InputError, match="dense cache holds 6 tokens; feeding 8"):
        dec.prefill([1, 2])
    assert dec.t == 6
    bounded = Decoder.build(tiny.model, CacheConfig(policy="streaming", sink=1, window=4))
    assert torch.isfinite(bounded.prefill(list(range(40)))).all()  # bounded: no limit


def test_bad_decoder_and_sampling_arguments(tiny):
    from fastdecode.engine import generate, sample

    with pytest.raises(ConfigError, match="chunk_size must be >= 1, got 0"):
        Decoder.build(tiny.model, CacheConfig(), chunk_size=0)
    logits = torch.randn(10)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        sample(logits, temperature=-1)
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        sample(logits, temperature=1, top_k=0)
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        sample(logits, temperature=1, top_p=1.5)
    dec = Decoder.build(tiny.model, CacheConfig(policy="window", sink=0, window=4))
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 0"):
        list(generate(dec, [1, 2], -1))


def test_errors_are_fastdecode_errors():
    for cls in (ConfigError, ModelLoadError, InputError, DeviceError):
        assert issubclass(cls, FastdecodeError)
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)


# --------------------------------------------------------------------------------- CLI
def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(code: int, err: str, *parts: str):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastdecode generate: error: "), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("kind", ["unknown-name", "missing-dir", "no-config", "bad-json",
                                  "unsupported-type", "missing-tensor", "not-gguf",
                                  "gguf-missing-tensor"])
def test_cli_bad_model(kind, tmp_path, capsys):
    path = _model_path(kind, tmp_path)
    code, out, err = run_cli(["generate", "--model", path, "--device", "cpu",
                              "--prompt", "hi"], capsys)
    assert_cli_error(code, err, *_expect(kind, path))


@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory):
    cfg = {**neox_config(), "vocab_size": 50304}  # the tokenizer's ids fit
    return str(write_hf_dir(tmp_path_factory.mktemp("cli") / "m", cfg=cfg, tokenizer=True))


@pytest.mark.parametrize(("extra", "expect"), [
    (["--sink", "-1"], ["sink must be >= 0, got -1"]),
    (["--window", "0"], ["window must be >= 1, got 0"]),
    (["--compress-every", "0"], ["compress_every must be >= 1, got 0"]),
    (["--prompt", ""], ["empty prompt"]),
    (["--dtype", "float8"], ["dtype 'float8' is not one of"]),
    (["--chunk-size", "0"], ["chunk_size must be >= 1"]),
    (["--model", "tiny-neox"], ["model tiny-neox has no tokenizer"]),
    (["--compile", "graphs"], ["needs the model on a CUDA device"]),
])
def test_cli_bad_arguments(hf_dir_with_tokenizer, extra, expect, capsys):
    good = ["generate", "--model", hf_dir_with_tokenizer, "--device", "cpu", "--prompt", "hi"]
    code, out, err = run_cli(good + extra, capsys)
    assert_cli_error(code, err, *expect)
    assert out.strip() in ("", "hi")  # at most the prompt echoed, nothing generated


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda(capsys):
    code, out, err = run_cli(["generate", "--model", "tiny-neox", "--device", "cuda",
                              "--prompt", "hi"], capsys)
    assert_cli_error(code, err, "'cuda'", "CUDA is not available")


def test_cli_tokenizer_larger_than_the_model(tmp_path, capsys):
    model = str(write_hf_dir(tmp_path / "m", tokenizer=True))  # vocab 101, tokenizer 50k
    code, out, err = run_cli(["generate", "--model", model, "--device", "cpu",
                              "--prompt", "Hello world"], capsys)
    assert_cli_error(code, err, "out of range for the model's vocabulary (0..100)")


def test_cli_dense_overflow(hf_dir_with_tokenizer, capsys):
    """A prompt longer than the dense cache fails before generating; a generation that
    runs past it fails when the cache is full, after streaming what fitted."""
    model = hf_dir_with_tokenizer
    base = ["generate", "--model", model, "--device", "cpu", "--policy", "dense"]
    prompt = "one two three four five six seven eight"
    code, out, err = run_cli(base + ["--max-len", "4", "--prompt", prompt], capsys)
    assert_cli_error(code, err, "dense cache holds 4 tokens", "bounded policy")
    assert out.strip() in ("", prompt)  # nothing generated
    code, out, err = run_cli(base + ["--max-len", "10", "--prompt", prompt,
                                     "--max-new-tokens", "5"], capsys)
    assert_cli_error(code, err, "dense cache holds 10 tokens; feeding 11")
    assert out.startswith(prompt) and len(out) > len(prompt)  # 3 tokens fitted
    code, out, err = run_cli(base + ["--max-len", "12", "--prompt", prompt,
                                     "--max-new-tokens", "3"], capsys)
    assert code == 0 and err == "" and out.startswith(prompt)
