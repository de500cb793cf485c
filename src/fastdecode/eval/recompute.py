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
import torch.nn.functional as F

from .. import rope
from ..models.transformer import Transformer


def context_ids(ids: torch.Tensor, t: int, sink: int, window: int) -> torch.Tensor:
    """The tokens re-encoded for the prediction at step ``t`` (see the module doc)."""
    if t <= sink + window:
        return ids[:t + 1]
    return torch.cat((ids[:sink], ids[t - window:t + 1]))


@torch.no_grad()
def last_logits_batched(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last position of each row of ``tokens`` [B, L], every row
    encoded from scratch with causal attention at positions 0..L-1.

    The same arithmetic as the model's own forward (its linears, norms, rotary), batched
    over independent sequences; the model's cache path is batch-1."""
    spec = model.spec
    B, L = tokens.shape
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    x = model.embed(tokens.reshape(-1))  # [B*L, hidden]
    cos, sin = rope.cos_sin(torch.arange(L, device=tokens.device), model.freqs, x.dtype)
    n = len(model.layers)
    rows = L
    for i, layer in enumerate(model.layers):
        last = i == n - 1
        h = layer.norm1(x)
        qkv = layer.attn.qkv(h).view(B, L, H + 2 * Hkv, D).transpose(1, 2)  # [B, heads, L, D]
        q, k, v = qkv.split((H, Hkv, Hkv), dim=1)
        k = rope.apply(k, cos, sin)
        if last:  # only the last query matters from here on
            q = rope.apply(q[:, :, -1:], cos[-1:], sin[-1:])
            x = x.view(B, L, -1)[:, -1].contiguous()
            rows = 1
        else:
            q = rope.apply(q, cos, sin)
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=not last)
        a = layer.attn.out(a.transpose(1, 2).reshape(B * rows, H * D))
        if layer.parallel:
            x = x + a + layer.mlp(layer.norm2(x))
        else:
            x = x + a
            x = x + layer.mlp(layer.norm2(x))
    return model.lm_head(model.norm(x))


def auto_batch(length: int, device: torch.device) -> int:
    """Contexts per batched pass: about 32k tokens on CUDA, 4k on CPU."""
    budget = 32768 if device.type == "cuda" else 4096
    return max(1, min(256, budget // max(length, 1)))
