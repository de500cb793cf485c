"""Sliding window with re-computation, the quality oracle StreamingLLM compares against:
each prediction re-encodes densely the tokens a strict ``S + W`` streaming cache lets it
see (docs/ppl.md, Modes)."""

from __future__ import annotations

import torch

from ..models.transformer import Transformer


def context_ids(ids: torch.Tensor, t: int, sink: int, window: int) -> torch.Tensor:
    """The tokens re-encoded for the prediction at step ``t``."""
    if t <= sink + window:
        return ids[:t + 1]
    return torch.cat((ids[:sink], ids[t - window:t + 1]))


@torch.no_grad()
def last_logits_batched(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last position of each row of ``tokens`` [B, L], each encoded
    from scratch (the cache path is batch-1)."""
    return model.forward_batch(tokens, last_only=True)


def auto_batch(length: int, device: torch.device) -> int:
    """Contexts per batched pass: about 32k tokens on CUDA, 4k on CPU."""
    budget = 32768 if device.type == "cuda" else 4096
    return max(1, min(256, budget // max(length, 1)))
