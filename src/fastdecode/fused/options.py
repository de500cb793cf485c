"""The fused step's options, one frozen object passed down to every launch; the environment
is read only by :meth:`FusedOptions.from_env`. No option changes a result beyond rounding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..errors import ConfigError

PARTS = (1, 2, 4)  # the input parts a tensor-core GEMV may be cut into
MIN_PER = 32  # fewest slots per split of the attention launch; sizes the partial buffers
WARPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class FusedOptions:
    """What the fused step may be told (None: chosen per model or shape; docs/gpu.md)."""

    pdl: bool = True  # programmatic dependent launch where the device has it (sm_90+)
    asm: bool | None = None  # int8/int4 codes to float in inline PTX (None: where it applies)
    int4: int | None = None  # 0 dot per group, 1 dequantise then reduce, 2 tensor cores
    parts: int | None = None  # input parts of a tensor-core GEMV, 1..4 (None: per shape)
    tune: bool = True  # launches from the card's table (fused/table.py); False: heuristic
    launch_table: str | None = None  # a table file instead of the bundled one (this card's)
    norm_in_gemv: int = 1  # 0 norms apart, 1 inside float GEMVs, 2 inside any GEMV
    branches: int | None = None  # two streams: 1 up beside attention, 2 the MLP, 0 one
    priority: bool | None = None  # the graph's main chain at a higher stream priority
    attn: tuple[int, int, int] | None = None  # (slots per split, BLOCK_N, num_warps)

    def __post_init__(self):
        for name in ("pdl", "tune"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("asm", "priority"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name} must be None, True or False, got "
                                  f"{getattr(self, name)!r}")
        for name, levels, optional in (("int4", 3, True), ("branches", 3, True),
                                       ("norm_in_gemv", 3, False)):
            v = getattr(self, name)
            if not (v is None and optional) and v not in range(levels):
                raise ConfigError(f"{name} must be one of 0..{levels - 1}"
                                  f"{' or None' if optional else ''}, got {v!r}")
        if self.launch_table is not None and not (isinstance(self.launch_table, str)
                                                  and self.launch_table):
            raise ConfigError(f"launch_table must be a file path, got {self.launch_table!r}")
        if self.parts not in (None, *range(1, PARTS[-1] + 1)):
            raise ConfigError(f"parts must be 1..{PARTS[-1]} or None, got {self.parts!r}")
        if self.attn is not None:
            per, bn, warps = self.attn
            if per < MIN_PER or per % bn or bn & (bn - 1) or warps not in WARPS:
                raise ConfigError(f"attn {self.attn!r}: slots per split >= {MIN_PER} and a "
                                  "multiple of BLOCK_N, a power of two; num_warps 1, 2, 4 "
                                  "or 8")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> FusedOptions:
        """The options ``FASTDECODE_<NAME>`` sets (integers; ATTN 'per,BLOCK_N,num_warps';
        LAUNCH_TABLE a path), then ``overrides``; a bad value is an error naming the variable."""
        env = os.environ if environ is None else environ
        kw = {}
        for f in fields(cls):
            var = f"FASTDECODE_{f.name.upper()}"
            v = env.get(var)
            if v in (None, ""):
                continue
            try:
                kw[f.name] = _parse(f.name, v)
                cls(**{f.name: kw[f.name]})
            except (ValueError, ConfigError) as e:
                raise ConfigError(f"{var}={v!r}: {e}") from None
        kw.update(overrides)
        return cls(**kw)


def _parse(name: str, v: str):
    if name == "launch_table":
        return v
    if name == "attn":
        try:
            per, bn, warps = (int(t) for t in v.split(","))
        except ValueError:
            raise ValueError("expected 'slots per split,BLOCK_N,num_warps', e.g. 64,16,2") \
                from None
        return per, bn, warps
    if not v.isdigit():
        raise ValueError("expected an integer")
    if name == "parts" and int(v) not in PARTS:
        raise ValueError(f"expected one of {', '.join(map(str, PARTS))}")
    if name in ("pdl", "tune", "asm", "priority"):
        if v not in ("0", "1"):
            raise ValueError("expected 0 or 1")
        return v == "1"
    return int(v)


__all__ = ["FusedOptions", "PARTS", "MIN_PER"]
