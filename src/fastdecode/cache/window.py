"""Sliding window without sinks: the last ``window`` tokens (lazily, with compress_every)."""

from .base import KVCache


class WindowCache(KVCache):
    name = "window"

    def __init__(self, cfg, **shape):
        super().__init__(cfg, sink=0, window=cfg.window, compress_every=cfg.compress_every,
                         **shape)
