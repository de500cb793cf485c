"""The tinygemm repacking for int4 on CUDA (the ``tinygemm`` backend of Int4Linear).

Backends (``module.backend``), the kernels the eager step (and torch.compile of it) runs:
- ``reference``: dequantize the weight, then ``F.linear`` — every device; the oracle.
- ``inductor`` (int8 only): ``linear(x, w.to(bf16)) * scale``, which torch.compile turns
  into one fused int8 reduction for one-row inputs (torchao's int8 weight-only formulation);
  bfloat16 only.
- ``tinygemm`` (int4 only): PyTorch's own ``_weight_int4pack_mm`` (the kernel torchao's
  ``tile_packed_to_4d`` format runs on), CUDA + bfloat16.

The fused step (fastdecode.fused) has GEMVs of its own over the same storage.
"""

from __future__ import annotations

import torch

BACKENDS = ("reference", "inductor", "tinygemm")


def to_tinygemm(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                inner_k_tiles: int | None = None):
    """Our int4 storage -> (tinygemm-packed weight, scales_and_zeros [K/g, N, 2] bf16).

    Same numbers, no re-quantization: tinygemm wants the even k in the high nibble and
    ``w = (q - 8) * scale + zero``, which is our convention. ``inner_k_tiles`` (K must be a
    multiple of 16 of them): the largest of 8, 4, 2 that divides K, unless given.
    """
    if inner_k_tiles is None:
        k = packed.shape[1] * 2
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    swapped = ((packed << 4) | (packed >> 4)).contiguous()
    w = torch.ops.aten._convert_weight_to_int4pack(swapped, inner_k_tiles)
    szs = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    return w, szs
