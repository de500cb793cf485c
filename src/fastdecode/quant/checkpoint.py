"""Quantized checkpoints (``fastdecode.json`` with spec, recipe and each file's size and
SHA-256, ``model.safetensors``, ``tokenizer.json``), which any command loads as ``--model
DIR``: verified on load, so damage is a one-line ModelLoadError, and written atomically."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import atomic
from ..errors import ModelLoadError
from ..models.spec import ModelSpec
from . import KINDS, QuantConfig

FORMAT = "fastdecode-quantized"
MARKER = "fastdecode.json"
VERSION = 2  # 2: with the manifest ("files")


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def save_quantized(lm, cfg: QuantConfig, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the checkpoint of ``lm`` (quantized with ``cfg``) as ``out_dir`` (a non-empty
    one only with ``force``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    if lm.spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic.atomic_dir(out, force=force, what="checkpoint directory") as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        if lm.tokenizer is not None:
            lm.tokenizer.backend.save(str(tmp / "tokenizer.json"))
        files = {f.name: file_digest(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        meta = {"format": FORMAT, "version": VERSION, "spec": asdict(lm.spec),
                "quant": cfg.to_dict(), "dtype": str(lm.model.dtype).removeprefix("torch."),
                "source": lm.source, "files": files}
        atomic.write_text(tmp / MARKER, json.dumps(meta, indent=2) + "\n", "checkpoint marker")
    return out


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def build_quantized_skeleton(model: nn.Module, cfg: QuantConfig, dtype) -> None:
    """Swap matching linears for empty quantized modules of the right shapes."""
    cls = KINDS[cfg.kind]
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and cfg.matches(name):
            kw = {"group_size": cfg.group_size} if cfg.kind == "int4" else {}
            model.set_submodule(name, cls(mod.in_features, mod.out_features,
                                          mod.bias is not None, dtype, device="meta", **kw))


def verify_files(path: Path, files) -> None:
    """Check every file the manifest lists against its size and SHA-256."""
    if not isinstance(files, dict):
        raise ModelLoadError(f"{path / MARKER} is malformed: 'files' is not a mapping")
    for name, want in files.items():
        f = path / name
        if Path(name).name != name or not isinstance(want, dict):
            raise ModelLoadError(f"{path / MARKER} is malformed: bad manifest entry {name!r}")
        if not f.is_file():
            raise ModelLoadError(f"checkpoint {path} lacks {name}, which its manifest lists")
        size = f.stat().st_size
        if size != want.get("size"):
            raise ModelLoadError(f"checkpoint file {f} has {size} bytes, its manifest says "
                                 f"{want.get('size')}: the file is damaged or was replaced")
        if file_digest(f)["sha256"] != want.get("sha256"):
            raise ModelLoadError(f"checkpoint file {f} does not match its SHA-256 in "
                                 f"{MARKER}: the file is damaged or was replaced")


def read_quantized(path: str | Path):
    """-> (spec, QuantConfig, state dict on CPU, tokenizer file or None), verified."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ModelLoadError(f"{path / MARKER} is not a {FORMAT} file")
        spec = ModelSpec(**meta["spec"]).validate()
        # written before QuantConfig had a method: int4 was then min-max (rtn) only
        cfg = QuantConfig(**{"method": "rtn", **meta["quant"]})
    except (KeyError, TypeError, ValueError) as e:  # JSON, UTF-8, ConfigError are ValueErrors
        raise ModelLoadError(f"{path / MARKER} is malformed: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path / MARKER}: {e.strerror or e}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{path} has no model.safetensors")
    if "files" in meta:
        verify_files(path, meta["files"])
    else:
        warnings.warn(f"checkpoint {path} has no manifest (written by an older fastdecode): "
                      "its files are not verified; write it again with fastdecode quantize",
                      stacklevel=2)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ModelLoadError(f"cannot read {weights}: {e}") from None
    tok = path / "tokenizer.json"
    return spec, cfg, state, tok if tok.is_file() else None


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                cfg: QuantConfig, spec: ModelSpec, optional: tuple[str, ...] = ()) -> None:
    """The checkpoint's tensors are exactly the model's: names, shapes, and integer codes
    where the recipe has them (floats may differ in dtype: cast on load)."""
    missing = [k for k in expected if k not in state and k not in optional]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ModelLoadError(
            f"quantized checkpoint tensors do not match its {MARKER} (recipe {cfg.name}, "
            f"{spec.num_layers} layers): "
            + "; ".join(f"{what} {len(v)} tensor(s), e.g. {v[:3]}"
                        for what, v in (("missing", missing), ("extra", extra)) if v))
    for k, want in expected.items():
        got = state.get(k)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            raise ModelLoadError(f"quantized checkpoint tensor {k!r} has shape "
                                 f"{tuple(got.shape)}; {MARKER} (recipe {cfg.name}) expects "
                                 f"{tuple(want.shape)}")
        if got.is_floating_point() != want.is_floating_point() or (
                not want.is_floating_point() and got.dtype != want.dtype):
            raise ModelLoadError(f"quantized checkpoint tensor {k!r} is "
                                 f"{str(got.dtype).removeprefix('torch.')}; recipe {cfg.name} "
                                 f"stores {str(want.dtype).removeprefix('torch.')}")


def load_quantized_into(model: nn.Module, cfg: QuantConfig, state: dict, dtype,
                        device) -> nn.Module:
    build_quantized_skeleton(model, cfg, dtype)
    tied = ("lm_head.weight",) if model.spec.tie_embeddings else ()
    check_state(model.state_dict(keep_vars=True), state, cfg, model.spec, optional=tied)
    model = model.to_empty(device=device)
    if model.spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.load_state_dict(state, strict=False)  # check_state matched the names: only tied ones
    return model.to(dtype)


__all__ = ["save_quantized", "is_quantized_dir", "read_quantized", "load_quantized_into"]
