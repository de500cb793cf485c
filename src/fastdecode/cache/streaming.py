"""StreamingLLM: ``sink`` attention sinks plus the last ``window`` tokens, strict
(compress_every=1) or lazy (evicting back to ``window`` every R tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVCache
from .policy import PolicyConfig, option


class StreamingCache(KVCache):
    def __init__(self, cfg: StreamingConfig, **shape):
        super().__init__(cfg, sink=cfg.sink, window=cfg.window,
                         compress_every=cfg.compress_every, **shape)


@dataclass(frozen=True, kw_only=True)
class StreamingConfig(PolicyConfig):
    """The first ``sink`` tokens plus the last ``window``; ``compress_every=R`` lets the
    window overrun by up to R-1 tokens and evicts back to ``window`` every R tokens."""

    policy = "streaming"
    cache_class = StreamingCache

    sink: int = option(4, "attention sinks kept (the first tokens, never evicted)", min=0)
    window: int = option(1020, "most recent tokens kept", min=1)
    compress_every: int = option(1, "lazy eviction: evict back to the window every R tokens "
                                 "(1 = strict)", min=1)

    @property
    def budget(self) -> int:
        return self.sink + self.window
