"""Attention of new queries over what a cache returns, with sink keys scored separately."""

from __future__ import annotations

import math

import torch

from .cache.base import Plan
from .cache.storage import KV


def attend(q: torch.Tensor, q_sink: torch.Tensor | None, kv: KV, plan: Plan,
           num_sink: int) -> torch.Tensor:
    """Softmax attention for T queries.

    q, q_sink: [Hq, T, D] (q_sink: the same queries rotated at the sink position);
    kv: keys, values [Hkv, Nk, D] (int8 storage: codes plus per-key scales, applied to the
    scores and the probabilities rather than to the keys/values); returns [Hq, T, D].
    Grouped-query attention when Hq > Hkv. In decode (``plan.key_is_sink is None``) the
    sinks are the first ``num_sink`` keys. ``kv.mask`` (score-based caches) replaces
    ``plan.mask`` by one mask per KV head, and ``kv.observe`` is handed the probabilities.
    """
    keys, values = kv.k, kv.v
    if kv.k_scale is not None:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    Hq, T, D = q.shape
    Hkv, Nk, _ = keys.shape
    G = Hq // Hkv
    qg = q.reshape(Hkv, G * T, D)
    if q_sink is None:
        scores = qg @ keys.transpose(1, 2)
    elif plan.key_is_sink is None:
        sg = q_sink.reshape(Hkv, G * T, D)
        scores = torch.cat((sg @ keys[:, :num_sink].transpose(1, 2),
                            qg @ keys[:, num_sink:].transpose(1, 2)), dim=-1)
    else:
        sg = q_sink.reshape(Hkv, G * T, D)
        scores = torch.where(plan.key_is_sink, sg @ keys.transpose(1, 2),
                             qg @ keys.transpose(1, 2))
    scores = scores.float().view(Hkv, G, T, Nk) * (1.0 / math.sqrt(D))
    if kv.k_scale is not None:
        scores = scores * kv.k_scale[:, None, None, :]
    mask = plan.mask if kv.mask is None else kv.mask[:, None]  # per-KV-head mask
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if kv.observe is not None:  # score-based eviction: what each key received
        kv.observe(probs)
    if kv.v_scale is not None:
        probs = probs * kv.v_scale[:, None, None, :]
    probs = probs.to(values.dtype).view(Hkv, G * T, Nk)
    return (probs @ values).view(Hq, T, D)
