"""Dense cache: every token, preallocated to ``max_len``; feeding past it is an error."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .base import KVCache
from .policy import PolicyConfig, option


class DenseCache(KVCache):
    def __init__(self, cfg: DenseConfig, **shape):
        # A window one short of max_len plus one ring slot of room: max_len slots in all.
        super().__init__(cfg, sink=0, window=cfg.max_len - 1, compress_every=1, **shape)

    def check_room(self, t_end: int) -> None:
        if t_end > self.cfg.max_len:
            raise InputError(f"the dense cache holds {self.cfg.max_len} tokens; feeding "
                             f"{t_end} needs a larger max_len or a bounded policy")

    def held_positions(self, t: int) -> list[int]:
        # Nothing is ever evicted; the generic ring arithmetic would report token 0 gone
        # once exactly max_len tokens fill the buffer.
        self.check_room(t)
        return list(range(max(t, 0)))


@dataclass(frozen=True, kw_only=True)
class DenseConfig(PolicyConfig):
    """Keep every token, up to ``max_len``."""

    policy = "dense"
    cache_class = DenseCache

    max_len: int = option(8192, "dense cache capacity (tokens)", min=1)

    @property
    def budget(self) -> int:
        return self.max_len

    @property
    def max_tokens(self) -> int:
        return self.max_len
