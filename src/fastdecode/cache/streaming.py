"""StreamingLLM: ``sink`` attention sinks plus the last ``window`` tokens.

Strict (compress_every=1) evicts the oldest window token each step once full; lazy
(compress_every=R) evicts back to ``window`` every R tokens. Positions per
``position_mode`` (see base.py for how ``cache`` positions stay exact at O(1) cost).
"""

from .base import KVCache


class StreamingCache(KVCache):
    name = "streaming"

    def __init__(self, cfg, **shape):
        super().__init__(cfg, sink=cfg.sink, window=cfg.window,
                         compress_every=cfg.compress_every, **shape)
