"""Quantized checkpoints: a directory with ``fastdecode.json`` (spec + recipe),
``model.safetensors`` (the quantized state) and ``tokenizer.json`` when the source had one.
Every command accepts such a directory as ``--model DIR``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..errors import ModelLoadError
from ..models.spec import ModelSpec
from . import KINDS, QuantConfig

FORMAT = "fastdecode-quantized"
MARKER = "fastdecode.json"


def save_quantized(lm, cfg: QuantConfig, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    if lm.spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"))
    meta = {"format": FORMAT, "version": 1, "spec": asdict(lm.spec), "quant": cfg.to_dict(),
            "dtype": str(lm.model.dtype).removeprefix("torch."), "source": lm.source}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if lm.tokenizer is not None:
        lm.tokenizer.backend.save(str(out / "tokenizer.json"))
    return out


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def build_quantized_skeleton(model: nn.Module, cfg: QuantConfig, dtype) -> None:
    """Swap matching linears for empty quantized modules of the right shapes."""
    cls = KINDS[cfg.kind]
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and cfg.matches(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            kw = {"group_size": cfg.group_size} if cfg.kind == "int4" else {}
            setattr(parent, child, cls(mod.in_features, mod.out_features, mod.bias is not None,
                                       dtype, device="meta", **kw))


def read_quantized(path: str | Path):
    """-> (spec, QuantConfig, state dict on CPU, tokenizer file or None)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise ModelLoadError(f"{path / MARKER} is not a {FORMAT} file")
        spec = ModelSpec(**meta["spec"]).validate()
        # written before QuantConfig had a method: int4 was then min-max (rtn) only
        cfg = QuantConfig(**{"method": "rtn", **meta["quant"]})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path / MARKER} is malformed: {e}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{path} has no model.safetensors")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ModelLoadError(f"cannot read {weights}: {e}") from None
    tok = path / "tokenizer.json"
    return spec, cfg, state, tok if tok.is_file() else None


def load_quantized_into(model: nn.Module, cfg: QuantConfig, state: dict, dtype,
                        device) -> nn.Module:
    build_quantized_skeleton(model, cfg, dtype)
    model = model.to_empty(device=device)
    if model.spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model.spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"quantized checkpoint does not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model.to(dtype)


__all__ = ["save_quantized", "is_quantized_dir", "read_quantized", "load_quantized_into"]
