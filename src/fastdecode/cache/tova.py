"""TOVA: ``budget`` tokens per layer, the same for every KV head; evicts the token the
current query attends to least, averaged over the layer's query heads (the oracle and the
exact semantics: :mod:`fastdecode.reference.tova`; the machinery:
:mod:`fastdecode.cache.scored`, with no recent window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import PolicyConfig, option
from .scored import ScoredCache, position_mode_option


class TOVACache(ScoredCache):
    name = "tova"
    rule = "mean"  # replaced: the current query's, averaged over the layer's heads

    def __init__(self, cfg: TOVAConfig, **shape):
        super().__init__(cfg, budget=cfg.budget, sink=cfg.sink, recent=0, **shape)

    def _new_scores(self, held: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        Hkv, G, _, N = probs.shape
        return probs[:, :, -1].reshape(Hkv * G, N).mean(0)[None].expand(Hkv, N)


@dataclass(frozen=True, kw_only=True)
class TOVAConfig(PolicyConfig):
    """TOVA's budget: at most ``budget`` tokens held per layer, ``sink`` of them (the text's
    first tokens, never evicted; the authors have none) included."""

    policy = "tova"
    cache_class = TOVACache

    budget: int = option(2048, "tokens held per layer (sinks included)", min=1)
    sink: int = option(0, "tokens at the start never evicted (the authors have none)", min=0)
    position_mode: str = position_mode_option()

    def check(self) -> None:
        if self.sink >= self.budget:
            raise self._error(f"the budget ({self.budget}) includes the sinks and must "
                              f"exceed them (sink={self.sink})")
