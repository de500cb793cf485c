"""H2O: ``sink`` tokens, the ``heavy`` highest-scored and the ``recent`` most recent, per
layer and KV head (the oracle and the exact semantics: :mod:`fastdecode.reference.h2o`).

A token's score is the sum of the probabilities it has received from every query, summed
over the query heads of its KV head; slots, scores and the device-side eviction are
:mod:`fastdecode.cache.scored`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import PolicyConfig, option
from .scored import ScoredCache, position_mode_option


class H2OCache(ScoredCache):
    name = "h2o"
    rule = "sum"  # added: the probabilities summed over the query heads of the group

    def __init__(self, cfg: H2OConfig, **shape):
        super().__init__(cfg, budget=cfg.budget, sink=cfg.sink, recent=cfg.recent, **shape)

    def _new_scores(self, held: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return held + probs.sum((1, 2))


@dataclass(frozen=True, kw_only=True)
class H2OConfig(PolicyConfig):
    """H2O's budgets: at most ``sink + heavy + recent`` tokens held per layer and KV head.

    ``position_mode``: ``absolute`` (keys keep their text position; the authors' default)
    or ``cache`` (keys at their rank in the cache; the authors' "position rolling")."""

    policy = "h2o"
    cache_class = H2OCache

    heavy: int = option(1024, "heavy hitters kept (highest accumulated attention)", min=0)
    recent: int = option(1024, "most recent tokens kept", min=0)
    sink: int = option(0, "tokens at the start never evicted (0 = plain H2O)", min=0)
    position_mode: str = position_mode_option()

    def check(self) -> None:
        if self.heavy + self.recent < 1:
            raise self._error("heavy + recent must be >= 1 (with both 0 it would keep "
                              f"nothing but the {self.sink} sinks)")

    @property
    def budget(self) -> int:
        return self.sink + self.heavy + self.recent
