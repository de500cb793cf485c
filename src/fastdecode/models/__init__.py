"""Model loading: a name (real model or shape preset) or a local directory -> LoadedModel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeviceError, ModelLoadError
from . import gguf_cache, presets, weights
from .hub import resolve_source
from .spec import ModelSpec
from .tokenizer import Tokenizer
from .transformer import Transformer


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Transformer
    tokenizer: Tokenizer | None
    source: str  # what was loaded: a name, a path, or "random:<preset>"
    quant: object | None = None  # the QuantConfig applied, if any


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not a valid torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device type {dev.type!r} is not supported (cpu, cuda)")
    return dev


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Raise DeviceError if ``device`` cannot run ``dtype`` (tries a tiny matmul)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; "
                          "use float16 or float32")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.layer_norm(a @ a, (4,))
    except RuntimeError as e:
        raise DeviceError(f"dtype {dtype} cannot run on {device}: {e}") from None


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | None = "cpu",
               random_weights: bool = False, seed: int = 0,
               revision: str | None = None) -> LoadedModel:
    """Load ``name``: a shape preset (random weights), ``smollm2-135m``, a GGUF file, a Hugging
    Face directory, a hub-cache directory or repo id (``revision``: default ``main``)."""
    dev = resolve_device(device)
    check_dtype(dtype, dev)
    name, hub = resolve_source(name, revision)
    tok = None
    if name in presets.SHAPE_PRESETS:
        spec = presets.SHAPE_PRESETS[name]()
        random_weights = True
        if name in presets.PRESET_TOKENIZERS:
            tok = Tokenizer.from_file(presets.PRESET_TOKENIZERS[name], spec.eos_token_id,
                                      spec.bos_token_id)
        state = None
    elif name == "smollm2-135m":
        spec, state, tok = gguf_cache.load_gguf(weights.smollm2_gguf_path())
    elif Path(name).is_dir() and (quantized := _load_quantized(name, dtype, dev)):
        return quantized
    elif Path(name).suffix == ".gguf":
        spec, state, tok = gguf_cache.load_gguf(name)
    elif Path(name).is_dir():
        spec, state, tok = weights.load_hf_dir(name)
    elif Path(name).exists():
        raise ModelLoadError(f"{name} is neither a model directory nor a .gguf file")
    elif "/" in name or "\\" in name or name.startswith((".", "~")):
        # Looks like a path, not a name: say so rather than list the known names.
        raise ModelLoadError(f"model path {name} does not exist")
    else:
        raise ModelLoadError(f"unknown model {name!r}: not a local path, and not one of "
                             f"{', '.join(presets.ALL_NAMES)}")
    if random_weights:
        state = weights.random_state(spec, seed=seed, dtype=dtype, device=dev)
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to_empty(device=dev).to(dtype)
    model.load_canonical(state)
    model.eval().requires_grad_(False)
    source = f"random:{hub or name}" if random_weights else (hub or name)
    return LoadedModel(spec, model, tok, source)


def _load_quantized(path: str, dtype: torch.dtype, dev: torch.device) -> LoadedModel | None:
    """The quantized checkpoint in ``path``; None if ``path`` is not one."""
    from ..quant.checkpoint import is_quantized_dir, load_quantized_into, read_quantized

    if not is_quantized_dir(path):
        return None
    spec, cfg, state, tok_file = read_quantized(path)
    with torch.device("meta"):
        model = Transformer(spec)
    model = load_quantized_into(model, cfg, state, dtype, dev)
    model.eval().requires_grad_(False)
    tok = Tokenizer.from_file(tok_file, spec.eos_token_id, spec.bos_token_id) if tok_file else None
    return LoadedModel(spec, model, tok, path, quant=cfg)


__all__ = ["LoadedModel", "ModelSpec", "Transformer", "Tokenizer", "load_model",
           "resolve_device", "check_dtype"]
