"""Fast paths for the quantized linears on CUDA, as torch custom ops (opaque to
torch.compile, capturable in CUDA graphs), and the tinygemm repacking for int4.

Backends (``module.backend``):
- ``reference``: dequantize the weight, then ``F.linear`` — every device; the oracle.
- ``triton``: our batch-1 GEMV kernels (quant/triton_gemv.py) for one-row inputs on CUDA;
  other inputs fall back to ``reference``.
- ``inductor`` (int8 only): ``linear(x, w.to(bf16)) * scale``, which torch.compile turns
  into one fused int8 reduction for one-row inputs (torchao's int8 weight-only formulation);
  bfloat16 only.
- ``tinygemm`` (int4 only): PyTorch's own ``_weight_int4pack_mm`` (the kernel torchao's
  ``tile_packed_to_4d`` format runs on), CUDA + bfloat16.
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("reference", "triton", "inductor", "tinygemm")


@functools.cache
def _ops():
    """Register the custom ops on first use (imports triton only then)."""
    from . import triton_gemv

    @torch.library.custom_op("fastdecode::int8_gemv", mutates_args=())
    def int8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        return triton_gemv.int8_gemv(x, w, scale, bias)

    @int8_gemv.register_fake
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.custom_op("fastdecode::int4_gemv", mutates_args=())
    def int4_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bias: torch.Tensor | None, group: int) -> torch.Tensor:
        return triton_gemv.int4_gemv(x, w, scale, zero, bias, group)

    @int4_gemv.register_fake
    def _(x, w, scale, zero, bias, group):
        return x.new_empty(x.shape[0], w.shape[0])

    return int8_gemv, int4_gemv


def int8_gemv(x, w, scale, bias):
    return _ops()[0](x, w, scale, bias)


def int4_gemv(x, w, scale, zero, bias, group: int):
    return _ops()[1](x, w, scale, zero, bias, group)


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
