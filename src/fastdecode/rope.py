"""Rotary position embeddings (rotate-half, partial rotary). Streaming positions grow
without bound, so angles are float64 from integer positions and only cos/sin are cast: in
float32, position 10^7 times a frequency is already ~1 radian off.
"""

from __future__ import annotations

import torch


def inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """The rotary frequencies, float64, shape [rotary_dim // 2]."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64,
                                        device=device) / rotary_dim)


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype):
    """cos and sin [T, rotary_dim // 2] of int64 ``positions`` [T] times ``freqs``, computed
    in float64 and cast to ``dtype``."""
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` [..., T, D]; the rest pass."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
