"""KV cache policies: one file per policy, one registry, one factory.

``POLICIES`` maps each policy's name to its config class and is the only list of policies:
the CLI's ``--policy`` choices and per-policy flags, the benchmarks and the tests read it.

Adding a policy (``h2o`` say) is one new file, one registry entry and its tests:

1. ``cache/h2o.py`` defines the cache and its config, as ``cache/streaming.py`` does::

       class H2OCache(KVCache):            # or any class with KVCache's interface:
           def __init__(self, cfg: H2OConfig, **shape): ...   # cfg, name, sink,
           # max_held(), plan_prefill/plan_decode/update, held_positions, reset

       @dataclass(frozen=True, kw_only=True)
       class H2OConfig(PolicyConfig):
           policy = "h2o"                  # the registry name
           cache_class = H2OCache          # make_cache builds cache_class(cfg, **shape)
           heavy: int = option(64, "heavy hitters kept", min=0)   # the policy's options
           recent: int = option(64, "most recent tokens kept", min=1)

           def check(self):                # rules across options (fields are checked)
               if self.heavy + self.recent < 1:
                   raise self._error("heavy + recent must be >= 1")

           @property
           def budget(self) -> int:        # read-only facts generic code reads (policy.py)
               return self.heavy + self.recent

   ``shape`` is ``num_layers, num_kv_heads, head_dim, dtype, device, position_offset``.
   Shared options (``position_mode``, ``kv_dtype``) come from :class:`PolicyConfig`;
   override the facts (``sink``, ``compress_every``, ``budget``, ``max_held``,
   ``max_tokens``) where the defaults do not hold. Every ``option`` becomes a CLI flag
   (``--heavy``); an option two policies share must have the same type and choices.
2. Add the config class to ``_CONFIGS`` below.
3. Tests: ``tests/test_policies.py`` runs every registered policy through its generic
   checks (validation, to_dict, the CLI); add the policy's oracle and property tests in
   its own test file.
"""

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
    """The config of ``policy`` from keyword options, e.g.
    ``CacheConfig(policy="streaming", sink=4, window=1020)`` -> ``StreamingConfig``.
    An option the policy does not have is a ConfigError naming the policy."""
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
    """Every option of every registered policy, the policies' own first, for the CLI:
    name -> {type, choices, help, defaults: {policy: default}}. Raises if two policies
    declare one name with different types or choices."""
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
