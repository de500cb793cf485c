"""TOVA: ``budget`` tokens per layer, the same for every KV head; evicts the token the
current query attends to least, averaged over the layer's query heads (the oracle and the
exact semantics: :mod:`fastdecode.reference.tova`; the machinery:
:mod:`fastdecode.cache.scored`, with no recent window).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .h2o import check_count, check_modes
from .scored import ScoredCache


@dataclass(frozen=True)
class TOVAConfig:
    """TOVA's budget: at most ``budget`` tokens held per layer, ``sink`` of them (the text's
    first tokens, never evicted; the authors have none) included."""

    policy: ClassVar[str] = "tova"
    budget: int = 2048
    sink: int = 0
    position_mode: str = "absolute"
    kv_dtype: str = "auto"

    def __post_init__(self):
        check_count("budget", self.budget, 1)
        check_count("sink", self.sink, 0)
        if self.sink >= self.budget:
            raise ConfigError(f"tova's budget ({self.budget}) includes its sinks and must "
                              f"exceed them (sink={self.sink})")
        check_modes(self.position_mode, self.kv_dtype)

    def to_dict(self) -> dict:
        return {"policy": self.policy, **asdict(self)}


class TOVACache(ScoredCache):
    name = "tova"

    def __init__(self, cfg: TOVAConfig, **shape):
        super().__init__(cfg, budget=cfg.budget, sink=cfg.sink, recent=0, **shape)

    def _new_scores(self, held: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        Hkv, G, _, N = probs.shape
        return probs[:, :, -1].reshape(Hkv * G, N).mean(0)[None].expand(Hkv, N)
