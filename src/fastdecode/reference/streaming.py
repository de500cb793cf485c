"""StreamingLLM as the paper's code does it: the oracle for every cache policy.

Keys cached *before* RoPE, grown by concatenation, evicted by slicing, and the whole cache
re-rotated every step; only the model's linears, norms and residual are shared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.transformer import Transformer


def _rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float):
    """x [H, N, D] rotated at int positions [N] (or [H, N]: a row of positions per head);
    angles and products in float64."""
    half = rotary_dim // 2
    freqs = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    ang = positions.to(torch.float64)[..., None] * freqs
    cos, sin = torch.cos(ang), torch.sin(ang)
    xd = x.to(torch.float64)
    x1, x2 = xd[..., :half], xd[..., half:rotary_dim]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, xd[..., rotary_dim:]),
                     -1).to(x.dtype)


@torch.no_grad()
def streaming_logits(model: Transformer, tokens, sink: int = 0, window: int | None = None,
                     compress_every: int = 1, position_mode: str = "cache",
                     position_offset: int = 0) -> torch.Tensor:
    """Logits [N, V] for each token fed one at a time (``window=None``: nothing evicted);
    the stream starts at text position ``position_offset`` (seen by ``absolute`` mode only)."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    cache = [dict(k=None, v=None, pos=None) for _ in model.layers]
    out = []
    for t, tok in enumerate(tokens.tolist()):
        x = model.embed(torch.tensor([tok], device=model.device))
        for layer, c in zip(model.layers, cache):
            h = layer.norm1(x)
            qkv = layer.attn.qkv(h).view(1, H + 2 * Hkv, D).transpose(0, 1)
            q, k, v = qkv[:H], qkv[H:H + Hkv], qkv[H + Hkv:]
            pos = torch.tensor([t + position_offset])
            c["k"] = k if c["k"] is None else torch.cat((c["k"], k), 1)
            c["v"] = v if c["v"] is None else torch.cat((c["v"], v), 1)
            c["pos"] = pos if c["pos"] is None else torch.cat((c["pos"], pos))
            n = c["k"].shape[1]
            if position_mode == "cache":
                kpos, qpos = torch.arange(n), torch.tensor([n - 1])
            else:
                kpos, qpos = c["pos"], pos
            kr = _rotate(c["k"], kpos, spec.rotary_dim, spec.rope_theta)
            qr = _rotate(q, qpos, spec.rotary_dim, spec.rope_theta)
            kr = kr.repeat_interleave(H // Hkv, dim=0)
            vr = c["v"].repeat_interleave(H // Hkv, dim=0)
            scores = (qr @ kr.transpose(1, 2)).float() / math.sqrt(D)
            a = torch.softmax(scores, -1).to(vr.dtype) @ vr
            x = layer.residual(x, layer.attn.out(a.transpose(0, 1).reshape(1, H * D)))
        out.append(model.lm_head(model.norm(x))[0])
        if window is not None:
            for c in cache:
                if c["k"].shape[1] >= sink + window + compress_every:
                    for key in ("k", "v"):
                        c[key] = torch.cat((c[key][:, :sink], c[key][:, -window:]), 1)
                    c["pos"] = torch.cat((c["pos"][:sink], c["pos"][-window:]))
    return torch.stack(out)


def dense_logits(model: Transformer, tokens) -> torch.Tensor:
    """Full causal attention over the whole sequence in one pass (plain SDPA)."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten().to(model.device)
    N = tokens.numel()
    x = model.embed(tokens)
    pos = torch.arange(N)
    for layer in model.layers:
        h = layer.norm1(x)
        qkv = layer.attn.qkv(h).view(N, H + 2 * Hkv, D).transpose(0, 1)
        q, k, v = qkv[:H], qkv[H:H + Hkv], qkv[H + Hkv:]
        q = _rotate(q, pos, spec.rotary_dim, spec.rope_theta)
        k = _rotate(k, pos, spec.rotary_dim, spec.rope_theta).repeat_interleave(H // Hkv, 0)
        v = v.repeat_interleave(H // Hkv, 0)
        a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        x = layer.residual(x, layer.attn.out(a.transpose(0, 1).reshape(N, H * D)))
    return model.lm_head(model.norm(x))
