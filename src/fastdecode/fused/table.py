"""Launch tables: the GEMV launch each shape takes on one class of GPU, measured offline.

A table is a JSON file written by ``scripts/gpu_gemv_sweep.py --table`` from a graphed sweep
of every candidate on one card: the devices it applies to (names as
``torch.cuda.get_device_name`` gives them, and the compute capability), how it was made,
and per GEMV shape (:func:`shape_key`) the winning configuration. Bundled tables live in
``fastdecode/assets/launch-<class>.json``. Looking one up involves no timing, so two
processes on one machine choose the same launches (a run-time tuner's picks moved TPOT by
up to 15% between processes on the H200, docs/gpu.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..quant.layout import INT4, INT8, Packed

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FORMATS = {0: "float", INT8: "int8", INT4: "int4"}
CFG_LEN = 7  # BLOCK_N, BLOCK_K, num_warps, num_stages, asm, int4 path, parts


@dataclass(frozen=True)
class Device:
    """What a launch choice may depend on: the card's name, capability and SM count."""

    name: str
    capability: tuple[int, int]
    sms: int

    @staticmethod
    @functools.cache
    def of(index: int) -> Device:
        props = torch.cuda.get_device_properties(index)
        return Device(props.name, (props.major, props.minor), props.multi_processor_count)


def shape_key(p: Packed, n: int, dtype: torch.dtype, norm: int, glu: bool) -> str:
    """'float 7680x2560 norm1 bfloat16', 'int4 2560x10240 g128 bfloat16': what a GEMV's
    launch depends on (format, rows, inputs, group, the norm inside, GLU, x's dtype)."""
    parts = [FORMATS[p.fmt], f"{n}x{p.k}"]
    if p.fmt in (INT8, INT4):
        parts.append(f"g{p.group}")
    if norm:
        parts.append(f"norm{norm}")
    if glu:
        parts.append("glu")
    parts.append(str(dtype).removeprefix("torch."))
    return " ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str  # the class, e.g. 'h200'
    path: str
    devices: tuple[str, ...]
    capability: tuple[int, int]
    gemv: dict  # shape key -> configuration (a tuple of CFG_LEN)

    def matches(self, dev: Device) -> bool:
        return dev.name in self.devices and dev.capability == self.capability


def _fail(path, why: str):
    raise ConfigError(f"launch table {path}: {why}")


@functools.cache
def load(path: str) -> Table:
    """A table file, checked: a ConfigError naming the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read launch table {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("gemv"), dict):
        _fail(path, "not an object with a 'gemv' object")
    devices, cc = data.get("devices"), data.get("capability")
    if not (isinstance(devices, list) and devices and all(isinstance(d, str) for d in devices)):
        _fail(path, "'devices' must be a non-empty list of device names")
    if not (isinstance(cc, list) and len(cc) == 2 and all(isinstance(c, int) for c in cc)):
        _fail(path, "'capability' must be [major, minor]")
    gemv = {}
    for key, entry in data["gemv"].items():
        cfg = entry.get("cfg") if isinstance(entry, dict) else None
        if not (isinstance(cfg, list) and len(cfg) == CFG_LEN
                and all(v is None or isinstance(v, (bool, int)) for v in cfg)):
            _fail(path, f"entry {key!r}: 'cfg' must be a list of {CFG_LEN} integers/booleans")
        bn, bk, warps, stages, asm, path_, parts = cfg
        gemv[key] = (bn, bk, warps, stages, bool(asm), path_, parts)
    return Table(str(data.get("class") or Path(path).stem.removeprefix("launch-")), str(path),
                 tuple(devices), (cc[0], cc[1]), gemv)


def bundled() -> list[Table]:
    return [load(str(p)) for p in sorted(ASSETS.glob("launch-*.json"))]


def for_device(dev: Device, path: str | None = None) -> Table | None:
    """The table for this card: the file ``path`` if given (it must name this card), else
    the bundled table that does; None for a card no table knows (the heuristic applies)."""
    if path is not None:
        t = load(path)
        if not t.matches(dev):
            raise ConfigError(f"launch table {path} is for {', '.join(t.devices)} (capability "
                              f"{t.capability}), not {dev.name} {dev.capability}")
        return t
    return next((t for t in bundled() if t.matches(dev)), None)


__all__ = ["Device", "Table", "shape_key", "load", "bundled", "for_device"]
