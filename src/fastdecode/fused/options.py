"""The fused step's options, one frozen object passed from the caller down to every launch.

Environment variables are read in one place, :meth:`FusedOptions.from_env`, called at the
edge (``compile_decoder`` when given no options, the command line, the GPU scripts); the
step, the tuner and the launches only ever see the object. None of the options changes a
result beyond accumulation order (tests/test_fused.py holds every path to the float64
reference and the step to eager); they exist for measurement (experiments/gpu_fused_ab.py).
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
    """What the fused step may be told (None: chosen per model or shape).

    - ``pdl``: programmatic dependent launch on devices that have it (Hopper and later): a
      kernel's programs are placed while the one before finishes.
    - ``asm``: int8/int4 codes to float by a byte permute in inline PTX (None: wherever it
      applies).
    - ``int4``: the int4 code path (0 dot per group, 1 dequantise then reduce, 2 tensor
      cores; see fused/kernels.py); None: tensor cores for groups of 128 or more where
      they apply, else 1.
    - ``parts``: input parts of a tensor-core GEMV (the tuner's choices: 1, 2, 4; any count
      up to 4 runs, e.g. 3 in tests: unequal parts); None: from its row blocks.
    - ``tune``: GEMV launches from the launch table of the card's class where it has one
      (``fused/table.py``; False: the heuristic alone). Nothing is timed at run time.
    - ``launch_table``: the launch table file to use instead of the bundled one (it must
      name this card; ``scripts/gpu_gemv_sweep.py --table`` writes one).
    - ``norm_in_gemv``: 0 every norm its own launch, 1 the GEMV normalises x itself where
      all GEMVs reading that norm are float, 2 whatever their format.
    - ``branches``: parallel-residual layers on two streams: 1 the MLP's up projection
      beside attention, 2 the whole MLP, 0 one stream; None: ``step.choose_branches``.
    - ``priority``: the captured graph's main chain at a higher stream priority than its
      side branch; None: ``step.choose_priority``.
    - ``attn``: the attention launch pinned as (slots per split, BLOCK_N, num_warps).
    """

    pdl: bool = True
    asm: bool | None = None
    int4: int | None = None
    parts: int | None = None
    tune: bool = True
    launch_table: str | None = None
    norm_in_gemv: int = 1
    branches: int | None = None
    priority: bool | None = None
    attn: tuple[int, int, int] | None = None

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
        """The options ``FASTDECODE_<NAME>`` sets (PDL, ASM, INT4, PARTS, TUNE,
        NORM_IN_GEMV, BRANCHES, PRIORITY: integers; ATTN: 'per,BLOCK_N,num_warps';
        LAUNCH_TABLE: a path), unset
        or empty ones at their defaults, then ``overrides``. A value that is not one the
        option takes is an error naming the variable."""
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
