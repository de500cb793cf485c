"""TOVA (Token Omission Via Attention, the authors' ``tova_cache.py`` in schwartz-lab-NLP/TOVA) as a
slow oracle.

One budget per layer: whenever more than ``budget`` tokens are held, the token with the
lowest score is evicted, the score being the *current* (last) query's probability averaged
over all the layer's query heads, so every KV head of a layer evicts the same token. No
recent window: the new token itself can go. Optional ``sink`` tokens (the text's first, never
evicted, counted in the budget; the authors have none). Ties evict the oldest. Positions
as for H2O (``absolute``: keys keep their text position, as the authors' cache does;
``cache``: re-rotated at their rank). See :mod:`fastdecode.reference.scored` for chunked
prefill (a chunk's scores are its last query's probabilities: the authors' prefill when
the prompt is one chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.transformer import Transformer
from .scored import ScoredRun, scored_logits


def tova_logits(model: Transformer, tokens, *, budget: int, sink: int = 0,
                position_mode: str = "absolute", position_offset: int = 0,
                chunks: Sequence[int] | None = None, kv_int8: bool = False) -> ScoredRun:
    """Logits [N, V] and state of TOVA over ``tokens`` (``chunks`` as for H2O)."""
    return scored_logits(model, tokens, rule="tova", budget=budget, sink=sink, recent=0,
                         position_mode=position_mode, position_offset=position_offset,
                         chunks=chunks, kv_int8=kv_int8)
