"""``fastdecode ppl`` through any registered cache policy (#23, #20 items 4/6: H2O,
TOVA, refresh): the modes outside ``eval.ppl.RING_MODES``, whose numbers are the policy's
own options (``EvalSpec(mode="h2o", options={"heavy": 124})``)."""

from __future__ import annotations

from dataclasses import fields

from ..cache import POLICIES, CacheConfig
from ..errors import ConfigError


def fill(spec, methods: tuple[str, ...]) -> None:
    """A policy mode's ``EvalSpec`` (``spec``) checked and filled from the policy's config:
    its options, the method (``token`` for score-based caches) and the ring fields."""
    cfg = CacheConfig(policy=spec.mode, **spec.options)
    derived = {"sink": cfg.sink, "window": getattr(cfg, "window", cfg.budget - cfg.sink),
               "compress_every": cfg.compress_every, "position_mode": cfg.position_mode,
               "kv_dtype": cfg.kv_dtype}
    defaults = {f.name: f.default for f in fields(spec)}
    moved = [n for n, v in derived.items() if getattr(spec, n) not in (defaults[n], v)]
    if moved:
        raise ConfigError(f"mode {spec.mode} takes its cache options in options=, not "
                          f"the fields {moved}")
    scored = getattr(cfg.cache_class, "score_based", False)
    method = spec.method or ("token" if scored else "parallel")
    if method not in methods:
        raise ConfigError(f"method {method!r} is not one of {methods}")
    if scored and method == "parallel":
        raise ConfigError(f"the exact parallel evaluator does not apply to {spec.mode}: "
                          "it evicts by attention score, and a prefill chunk evicts once "
                          "per chunk; use method token (one step per token)")
    if spec.chunk_size is not None and (not isinstance(spec.chunk_size, int)
                                        or spec.chunk_size < 1):
        raise ConfigError(f"chunk_size must be an integer >= 1, got {spec.chunk_size!r}")
    opts = {k: v for k, v in cfg.to_dict().items() if k != "policy"}
    for name, value in {"options": opts, "method": method, **derived}.items():
        object.__setattr__(spec, name, value)


def label(spec) -> str:
    """A policy mode's short name: the policy, its own integer options, the position mode."""
    own = POLICIES[spec.mode].options()
    return "-".join([spec.mode] + [f"{k}{v}" if isinstance(v, int) else str(v)
                                   for k, v in spec.options.items() if k in own[:-2]]
                    + [spec.position_mode]
                    + ([f"kv{spec.kv_dtype}"] if spec.kv_dtype != "auto" else []))
