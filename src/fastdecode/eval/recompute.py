"""Sliding window with re-computation: the quality oracle StreamingLLM compares against.

For the prediction made at step ``t`` (the token ``t`` fed, token ``t+1`` scored), the
context is re-encoded from scratch with dense attention, positions restarting at 0:

    context(t) = tokens[0 : t+1]                        if t <= S + W
               = tokens[0 : S] + tokens[t-W : t+1]       otherwise

i.e. exactly the tokens a strict (R = 1) ``S + W`` streaming cache lets step ``t`` attend
to (``S + W + 1`` keys once full, the query itself included), but with every key/value
computed afresh inside that context instead of kept from when it was first seen. ``S = 0``
is the paper's "sliding window with re-computation" with window ``W``; ``S > 0`` is the same
oracle for sinks + window. O(N * (S + W)) work for N tokens.

Two exact ways to compute it (equal up to rounding; tests hold them together):

- ``token``: a dense :class:`~fastdecode.engine.Decoder` prefill of each context;
- ``parallel`` (default): the contexts shorter than ``S + W + 1`` are the prefixes of the
  text, so one dense chunked pass gives them all; the full-length ones are batched,
  ``batch`` contexts per forward pass of :func:`last_logits_batched`.
"""

from __future__ import annotations

import torch

from ..models.transformer import Transformer


def context_ids(ids: torch.Tensor, t: int, sink: int, window: int) -> torch.Tensor:
    """The tokens re-encoded for the prediction at step ``t`` (see the module doc)."""
    if t <= sink + window:
        return ids[:t + 1]
    return torch.cat((ids[:sink], ids[t - window:t + 1]))


@torch.no_grad()
def last_logits_batched(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last position of each row of ``tokens`` [B, L], every row
    encoded from scratch with causal attention at positions 0..L-1
    (:meth:`Transformer.forward_batch`; the model's cache path is batch-1)."""
    return model.forward_batch(tokens, last_only=True)


def auto_batch(length: int, device: torch.device) -> int:
    """Contexts per batched pass: about 32k tokens on CUDA, 4k on CPU."""
    budget = 32768 if device.type == "cuda" else 4096
    return max(1, min(256, budget // max(length, 1)))
