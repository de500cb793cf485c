"""KV cache policies. One file per policy; ``make_cache`` picks one from a CacheConfig."""

from __future__ import annotations

import torch

from ..config import CacheConfig
from .base import KVCache, Plan
from .dense import DenseCache
from .h2o import H2OCache, H2OConfig
from .streaming import StreamingCache
from .tova import TOVACache, TOVAConfig
from .window import WindowCache

POLICIES = {cls.name: cls for cls in (DenseCache, WindowCache, StreamingCache, H2OCache,
                                      TOVACache)}
# The score-based policies have a config class of their own (CacheConfig: the others).
SCORED_CONFIGS = {cfg.policy: cfg for cfg in (H2OConfig, TOVAConfig)}


def make_cache(cfg: CacheConfig | H2OConfig | TOVAConfig, spec, dtype=torch.float32,
               device="cpu", position_offset: int = 0) -> KVCache:
    cls = POLICIES[cfg.policy]
    rotary = ({"rotary_dim": spec.rotary_dim, "rope_theta": spec.rope_theta}
              if getattr(cls, "needs_rotary", False) else {})
    return cls(cfg, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
               head_dim=spec.head_dim, dtype=dtype, device=device,
               position_offset=position_offset, **rotary)


__all__ = ["KVCache", "Plan", "make_cache", "POLICIES", "SCORED_CONFIGS", "DenseCache",
           "WindowCache", "StreamingCache", "H2OCache", "H2OConfig", "TOVACache",
           "TOVAConfig"]
