"""Attention of new queries over what a cache returns, with sink keys scored separately."""

from __future__ import annotations

import math

import torch

from .cache.base import Plan


def attend(q: torch.Tensor, q_sink: torch.Tensor | None, keys: torch.Tensor,
           values: torch.Tensor, plan: Plan, num_sink: int) -> torch.Tensor:
    """Softmax attention for T queries.

    q, q_sink: [Hq, T, D] (q_sink: the same queries rotated at the sink position);
    keys, values: [Hkv, Nk, D]; returns [Hq, T, D]. Grouped-query attention when Hq > Hkv.
    In decode (``plan.key_is_sink is None``) the sinks are the first ``num_sink`` keys.
    """
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
    scores = scores.masked_fill(~plan.mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(Hkv, G * T, Nk)
    return (probs @ values).view(Hq, T, D)
