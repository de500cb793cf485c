"""H2O (Heavy-Hitter Oracle, FMInference/H2O ``h2o_hf/utils_real_drop``) as a slow oracle.

Budgets ``heavy`` and ``recent`` (token counts) and optional ``sink`` tokens (never
evicted; 0 is plain H2O). Per layer and KV head, every held token's score is the sum of
the softmax probabilities it has received from every query (for GQA summed over the query
heads of the group; the new token's own probability included; a prompt's scores start as
the column sums of its causal attention). Whenever more than ``sink + heavy + recent``
tokens are held, the lowest-score token outside the ``recent`` most recent is evicted
(ties: the oldest). Keys keep their text-position rotation (``absolute``, the authors'
default) or are re-rotated at their rank in the cache each step (``cache``, the authors'
"position rolling" variant). With ``heavy=0`` this is StreamingLLM with ``sink`` sinks and
a window of ``recent``. See :mod:`fastdecode.reference.scored` for chunked prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.transformer import Transformer
from .scored import ScoredRun, scored_logits


def h2o_logits(model: Transformer, tokens, *, heavy: int, recent: int, sink: int = 0,
               position_mode: str = "absolute", position_offset: int = 0,
               chunks: Sequence[int] | None = None, kv_int8: bool = False) -> ScoredRun:
    """Logits [N, V] and state of H2O over ``tokens`` (``chunks``: prefill chunk sizes;
    None: one token at a time)."""
    return scored_logits(model, tokens, rule="h2o", budget=sink + heavy + recent, sink=sink,
                         recent=recent, position_mode=position_mode,
                         position_offset=position_offset, chunks=chunks, kv_int8=kv_int8)
