"""KV cache policies: one file per policy, one registry (``POLICIES``, the only list of
policies: the CLI, benchmarks and tests read it), one factory. Adding a policy:
docs/design.md#adding-a-cache-policy."""

from __future__ import annotations

from dataclasses import fields

import torch

from ..errors import ConfigError
from .base import KVCache, Plan
from .dense import DenseCache, DenseConfig
from .h2o import H2OCache, H2OConfig
from .policy import KV_DTYPES, POSITION_MODES, PolicyConfig, option
from .refresh import RefreshCache, RefreshConfig
from .streaming import StreamingCache, StreamingConfig
from .tova import TOVACache, TOVAConfig
from .window import WindowCache, WindowConfig

_CONFIGS = (DenseConfig, WindowConfig, StreamingConfig, H2OConfig, TOVAConfig,
            RefreshConfig)
POLICIES: dict[str, type[PolicyConfig]] = {c.policy: c for c in _CONFIGS}


def CacheConfig(policy: str = "streaming", **options) -> PolicyConfig:  # noqa: N802
    """The config of ``policy`` from keyword options (``CacheConfig(policy="streaming",
    sink=4, window=1020)`` -> ``StreamingConfig``); a foreign option is a ConfigError."""
    try:
        cls = POLICIES[policy]
    except (KeyError, TypeError):
        raise ConfigError(f"cache policy {policy!r} is not one of {tuple(POLICIES)}") from None
    return cls.from_options(**options)


def make_cache(cfg: PolicyConfig, spec, dtype=torch.float32, device="cpu",
               position_offset: int = 0) -> KVCache:
    cls = cfg.cache_class
    # Score-based caches in cache position mode re-rotate keys at read time.
    rotary = ({"rotary_dim": spec.rotary_dim, "rope_theta": spec.rope_theta}
              if getattr(cls, "needs_rotary", False) else {})
    return cls(cfg, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
               head_dim=spec.head_dim, dtype=dtype, device=device,
               position_offset=position_offset, **rotary)


def policy_options() -> dict[str, dict]:
    """Every option of every registered policy for the CLI: name -> {type, choices, help,
    defaults: {policy: default}}; two policies may not declare one name differently."""
    shared = {f.name for f in fields(PolicyConfig)}
    pairs = [(cls, f) for cls in POLICIES.values() for f in fields(cls)]
    out: dict[str, dict] = {}
    for cls, f in sorted(pairs, key=lambda p: p[1].name in shared):
        choices = f.metadata.get("choices")
        entry = out.setdefault(f.name, {"type": type(f.default), "choices": choices,
                                        "help": f.metadata.get("help", ""), "defaults": {}})
        if (entry["type"], entry["choices"]) != (type(f.default), choices):
            raise ConfigError(f"option {f.name!r} is declared with different types or choices "
                              f"by the policies {sorted(entry['defaults'])} and {cls.policy!r}")
        entry["defaults"][cls.policy] = f.default
    return out


__all__ = ["KVCache", "Plan", "make_cache", "CacheConfig", "POLICIES", "PolicyConfig",
           "option", "policy_options", "POSITION_MODES", "KV_DTYPES", "DenseCache",
           "DenseConfig", "WindowCache", "WindowConfig", "StreamingCache", "StreamingConfig",
           "H2OCache", "H2OConfig", "TOVACache", "TOVAConfig", "RefreshCache", "RefreshConfig"]
