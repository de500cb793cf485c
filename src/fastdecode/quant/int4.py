"""int4 weight-only linear: asymmetric groups of ``group_size`` along the input dim.

Storage (CPU and checkpoints): two 4-bit codes per byte along the input dim (low nibble
first), and per group a scale and a zero, with ``w = (q - 8) * scale + zero`` — the
convention of PyTorch's tinygemm kernel (``_weight_int4pack_mm``), so the CUDA fast path
repacks the same numbers without re-quantizing.

An input width that is not a multiple of the group (SmolLM2's 576 with groups of 128) is
padded with zero columns up to one: the last group holds the real columns and zeros, and
the input is padded with zeros before the packed kernels see it, so the padding adds
nothing to any output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)


def padded_width(in_features: int, group_size: int) -> int:
    """The stored input width: ``in_features`` rounded up to a whole number of groups."""
    return -(-in_features // group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int):
    """w [out, in] -> (packed uint8 [out, p/2], scale [out, p/g], zero [out, p/g]) with
    p = in rounded up to a multiple of g (zero columns)."""
    out_f, in_f = w.shape
    pad = padded_width(in_f, group_size) - in_f
    w = torch.nn.functional.pad(w.float(), (0, pad)) if pad else w
    in_f += pad
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = lo + 8 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_f, in_f)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> codes uint8 [out, in]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scale, zero, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    q = q.reshape(out_f, in_f // group_size, group_size)
    w = (q - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(out_f, in_f)


class Int4Linear(nn.Module):
    kind = "int4"
    backend = "reference"  # or "triton" / "tinygemm" (see quant/kernels.py)
    _tinygemm = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, group_size: int,
                 device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size} is not one of {GROUP_SIZES}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_width(in_features, group_size)
        groups = self.padded_in // group_size
        self.register_buffer("weight", torch.zeros(out_features, self.padded_in // 2,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 128, **_) -> Int4Linear:
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, group_size,
                w.device)
        packed, scale, zero = quantize_int4(w, group_size)
        m.weight.copy_(packed)
        m.scale.copy_(scale.to(w.dtype))
        m.zero.copy_(zero.to(w.dtype))
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def dequantized(self) -> torch.Tensor:
        w = dequantize_int4(self.weight, self.scale, self.zero, self.group_size)
        return w[:, :self.in_features]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.padded_in - self.in_features
        return torch.nn.functional.pad(x, (0, extra)) if extra else x

    def set_backend(self, backend: str) -> None:
        if backend not in ("reference", "triton", "tinygemm"):
            raise ConfigError(f"int4 backend {backend!r} is not one of reference, triton, "
                              "tinygemm")
        self._tinygemm = None
        if backend == "tinygemm":
            if not self.weight.is_cuda:
                raise ConfigError("the tinygemm int4 backend needs the model on CUDA")
            from .kernels import to_tinygemm

            self._tinygemm = to_tinygemm(self.weight, self.scale, self.zero)
        self.backend = backend

    def forward(self, x):
        if self.backend == "tinygemm":
            w, szs = self._tinygemm
            y = torch.ops.aten._weight_int4pack_mm(self._pad(x.to(torch.bfloat16)), w,
                                                   self.group_size, szs)
            y = y.to(x.dtype)
            return y + self.bias if self.bias is not None else y
        if self.backend == "triton" and x.is_cuda and x.shape[0] == 1:
            from .kernels import int4_gemv

            return int4_gemv(self._pad(x), self.weight, self.scale, self.zero, self.bias,
                             self.group_size)
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 g{self.group_size}"
