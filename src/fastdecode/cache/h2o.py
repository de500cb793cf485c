"""H2O: ``sink`` tokens, the ``heavy`` highest-scored and the ``recent`` most recent, per
layer and KV head (the oracle and the exact semantics: :mod:`fastdecode.reference.h2o`).

A token's score is the sum of the probabilities it has received from every query, summed
over the query heads of its KV head; slots, scores and the device-side eviction are
:mod:`fastdecode.cache.scored`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..config import KV_DTYPES, POSITION_MODES
from ..errors import ConfigError
from .scored import ScoredCache


def check_count(name: str, value, minimum: int) -> None:
    """A clear error for a budget that is not an integer >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def check_modes(position_mode: str, kv_dtype: str) -> None:
    if position_mode not in POSITION_MODES:
        raise ConfigError(f"position mode {position_mode!r} is not one of {POSITION_MODES}")
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype {kv_dtype!r} is not one of {KV_DTYPES}")


@dataclass(frozen=True)
class H2OConfig:
    """H2O's budgets: at most ``sink + heavy + recent`` tokens held per layer and KV head.

    ``position_mode``: ``absolute`` (keys keep their text position; the authors' default)
    or ``cache`` (keys at their rank in the cache; the authors' "position rolling")."""

    policy: ClassVar[str] = "h2o"
    heavy: int = 1024
    recent: int = 1024
    sink: int = 0
    position_mode: str = "absolute"
    kv_dtype: str = "auto"

    def __post_init__(self):
        check_count("heavy", self.heavy, 0)
        check_count("recent", self.recent, 0)
        check_count("sink", self.sink, 0)
        if self.heavy + self.recent < 1:
            raise ConfigError("h2o needs heavy + recent >= 1 (with both 0 it would keep "
                              f"nothing but the {self.sink} sinks)")
        check_modes(self.position_mode, self.kv_dtype)

    @property
    def budget(self) -> int:
        return self.sink + self.heavy + self.recent

    def to_dict(self) -> dict:
        return {"policy": self.policy, **asdict(self)}


class H2OCache(ScoredCache):
    name = "h2o"

    def __init__(self, cfg: H2OConfig, **shape):
        super().__init__(cfg, budget=cfg.budget, sink=cfg.sink, recent=cfg.recent, **shape)

    def _new_scores(self, held: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return held + probs.sum((1, 2))
