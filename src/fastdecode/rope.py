"""Rotary position embeddings (rotate-half convention, partial rotary).

Positions grow without bound in streaming (millions of tokens), so angles are computed in
float64 from integer positions and only cos/sin are cast to the compute dtype: in float32,
position 10^7 times a frequency would already be off by ~1 radian.
"""

from __future__ import annotations

import torch


def inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """The rotary frequencies, float64, shape [rotary_dim // 2]."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim
    return 1.0 / (theta ** exponents)


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype):
    """cos and sin of ``positions[:, None] * freqs``, computed in float64, cast to ``dtype``.

    ``positions``: int64 [T]; returns two tensors [T, rotary_dim // 2].
    """
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of the last axis of ``x`` [..., T, D].

    ``cos``/``sin`` are [T, rotary_dim // 2]; the remaining dims pass through unchanged.
    """
    half = cos.shape[-1]
    rot = 2 * half
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    return torch.cat((out1, out2, rest), dim=-1)
