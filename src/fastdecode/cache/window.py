"""Sliding window without sinks: the last ``window`` tokens (lazily, with compress_every)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVCache
from .policy import PolicyConfig, option


class WindowCache(KVCache):
    def __init__(self, cfg: WindowConfig, **shape):
        super().__init__(cfg, sink=0, window=cfg.window, compress_every=cfg.compress_every, **shape)


@dataclass(frozen=True, kw_only=True)
class WindowConfig(PolicyConfig):
    """The last ``window`` tokens; ``compress_every=R`` evicts back to them every R tokens."""

    policy = "window"
    cache_class = WindowCache
    foreign_hints = {"sink": "the window policy keeps no sinks (sink={value}); use "
                             "policy='streaming' for sinks + a window"}

    window: int = option(1020, "most recent tokens kept", min=1)
    compress_every: int = option(1, "lazy eviction: evict back to the window every R tokens "
                                 "(1 = strict)", min=1)

    @property
    def budget(self) -> int:
        return self.window
