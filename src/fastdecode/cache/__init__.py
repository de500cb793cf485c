"""KV cache policies. One file per policy; ``make_cache`` picks one from a CacheConfig."""

from __future__ import annotations

import torch

from ..config import CacheConfig
from .base import KVCache, Plan
from .dense import DenseCache
from .streaming import StreamingCache
from .window import WindowCache

POLICIES = {cls.name: cls for cls in (DenseCache, WindowCache, StreamingCache)}


def make_cache(cfg: CacheConfig, spec, dtype=torch.float32, device="cpu",
               position_offset: int = 0) -> KVCache:
    return POLICIES[cfg.policy](cfg, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                                head_dim=spec.head_dim, dtype=dtype, device=device,
                                position_offset=position_offset)


__all__ = ["KVCache", "Plan", "make_cache", "POLICIES", "DenseCache", "WindowCache",
           "StreamingCache"]
