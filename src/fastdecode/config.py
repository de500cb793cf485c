"""Validated configuration dataclasses shared by the library, CLI, tests and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

POLICIES = ("dense", "window", "streaming")
POSITION_MODES = ("cache", "absolute")
KV_DTYPES = ("auto", "int8")
COMPILE_MODES = ("none", "default", "graphs")
KERNEL_MODES = ("auto", "fused", "inductor")
GEMV_MODES = ("auto", "reduction", "extern")  # the inductor path's GEMV (fastdecode.compile)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    """What the KV cache keeps.

    - ``dense``: every token, up to ``max_len`` (an error past it).
    - ``window``: the last ``window`` tokens, no sinks.
    - ``streaming``: the first ``sink`` tokens plus the last ``window`` (StreamingLLM).
      ``compress_every=R`` lets the window overrun by up to R-1 tokens and evicts back to
      ``window`` in one go every R tokens once full; R=1 is strict per-token eviction.
    ``position_mode``: ``cache`` rotates each key at its slot in the cache and the query at
    its own slot (the paper's); ``absolute`` keeps every token's position in the text.
    """

    policy: str = "streaming"
    sink: int = 4
    window: int = 2044
    compress_every: int = 1
    position_mode: str = "cache"
    max_len: int = 4096  # dense only
    kv_dtype: str = "auto"  # "auto" (the model dtype) | "int8" (per-head, per-token scales)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"cache policy {self.policy!r} is not one of {POLICIES}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {self.kv_dtype!r} is not one of {KV_DTYPES}")
        if self.position_mode not in POSITION_MODES:
            raise ConfigError(f"position mode {self.position_mode!r} is not one of "
                              f"{POSITION_MODES}")
        for name, value in (("sink", self.sink), ("window", self.window),
                            ("compress_every", self.compress_every), ("max_len", self.max_len)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.sink < 0:
            raise ConfigError(f"sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.compress_every < 1:
            raise ConfigError(f"compress_every must be >= 1, got {self.compress_every}")
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        if self.policy == "window" and self.sink:
            raise ConfigError("the window policy keeps no sinks; use policy='streaming' "
                              f"for sink={self.sink}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CompileConfig:
    """How the decode step runs: ``none`` (eager), ``default`` (compiled kernels launched
    one by one), ``graphs`` (the step captured as one CUDA graph; CUDA only). ``kernels``:
    whose kernels make the step: ``fused`` (our Triton step, fastdecode.fused), ``inductor``
    (torch.compile of the eager step), ``auto`` (fused on CUDA, inductor elsewhere)."""

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
