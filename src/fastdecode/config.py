"""Validated configuration shared by the library, CLI, tests and benchmarks (the cache
policies' configs live with their policies)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

COMPILE_MODES = ("none", "default", "graphs")
KERNEL_MODES = ("auto", "fused", "inductor")
GEMV_MODES = ("auto", "reduction", "extern")  # the inductor path's GEMV (fastdecode.compile)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CompileConfig:
    """How the decode step runs (``mode``) and whose kernels make it (see compile.py)."""
    mode: str = "none"
    kernels: str = "auto"

    def __post_init__(self):
        if self.mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode {self.mode!r} is not one of {COMPILE_MODES}")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"kernels {self.kernels!r} is not one of {KERNEL_MODES}")


def parse_dtype(name: str):
    import torch

    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
               "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {DTYPES} (or fp32/bf16/fp16)")
    return getattr(torch, name)
