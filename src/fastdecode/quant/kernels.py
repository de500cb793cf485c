"""The tinygemm repacking for int4 on CUDA. Backends (``module.backend``) of the eager step:
``reference`` (dequantize, ``F.linear``: the oracle), ``inductor`` (int8, bfloat16: fuses
under torch.compile, torchao's formulation), ``tinygemm`` (int4, CUDA: ``_weight_int4pack_mm``).
"""

from __future__ import annotations

import torch


def to_tinygemm(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                inner_k_tiles: int | None = None):
    """Our int4 storage -> (tinygemm-packed weight, scales_and_zeros [K/g, N, 2] bf16): the
    same numbers with the even k in the high nibble; ``inner_k_tiles``: the largest that fits."""
    if inner_k_tiles is None:
        k = packed.shape[1] * 2
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    swapped = ((packed << 4) | (packed >> 4)).contiguous()
    w = torch.ops.aten._convert_weight_to_int4pack(swapped, inner_k_tiles)
    szs = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    return w, szs
