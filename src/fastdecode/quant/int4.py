"""int4 weight-only linear: asymmetric groups along the input dim, ``w = (q - 8) * scale +
zero``, two codes a byte (low nibble first): tinygemm's convention, so the CUDA path repacks
the same numbers; widths that are not whole groups are padded with zero columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)


def padded_width(in_features: int, group_size: int) -> int:
    """The stored input width: ``in_features`` rounded up to a whole number of groups."""
    return -(-in_features // group_size) * group_size


METHODS = ("search", "rtn")
# The search's starts (min-max range shrunk about its centre) and refinement rounds
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
REFINE_STEPS = 2
_CHUNK_ELEMENTS = 1 << 22  # rows are fitted in chunks of about this many weights


def quantize_int4(w: torch.Tensor, group_size: int, *, method: str = "search",
                  importance: torch.Tensor | None = None,
                  param_dtype: torch.dtype | None = None):
    """w [out, in] -> (packed uint8 [out, p/2], scale, zero [out, p/g] float32), p = in
    padded to whole groups; ``rtn`` or ``search`` (docs/quant.md), errors weighted by
    ``importance`` [in] and judged with scale and zero rounded to ``param_dtype``."""
    if method not in METHODS:
        raise ConfigError(f"int4 method {method!r} is not one of {METHODS}")
    out_f, in_f = w.shape
    p = padded_width(in_f, group_size)
    dtype = param_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    wf = F.pad(w.float(), (0, p - in_f)).reshape(out_f, p // group_size, group_size)
    real = (torch.arange(p, device=w.device) < in_f).reshape(p // group_size, group_size)
    imp = torch.ones(in_f, device=w.device) if importance is None else importance.float()
    imp = F.pad(imp.to(w.device), (0, p - in_f)).reshape(real.shape)
    scale = torch.empty(wf.shape[:2], device=w.device)
    zero = torch.empty_like(scale)
    rows = max(1, _CHUNK_ELEMENTS // p)
    for r in range(0, out_f, rows):
        scale[r:r + rows], zero[r:r + rows] = _fit(wf[r:r + rows], real, imp, method, dtype)
    return pack_int4(codes_int4(wf, scale, zero).reshape(out_f, p)), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [out, in] (0..15) -> uint8 [out, in/2], low nibble first."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def codes_int4(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest codes (uint8 0..15) of w [..., G, g] given scale, zero [..., G]."""
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8)
    return q.clamp(0, 15).to(torch.uint8)


def round_params(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """(scale, zero) as ``dtype`` stores them, back in float32; scale stays > 0."""
    info = torch.finfo(dtype)
    tiny = max(1e-8, info.tiny * info.eps)  # fp16: its smallest subnormal, 6e-8
    return scale.clamp(min=tiny).to(dtype).float(), zero.to(dtype).float()


def _fit(g: torch.Tensor, real: torch.Tensor, imp: torch.Tensor, method: str, dtype):
    """Per-group (scale, zero) of g [R, G, g]; ``real`` [G, g] masks the padding, ``imp``
    [G, g] weights the squared errors."""
    lo = torch.where(real, g, torch.inf).amin(-1)
    hi = torch.where(real, g, -torch.inf).amax(-1)
    n = imp.sum(-1).clamp(min=1e-30)
    best = None
    for s in SHRINKS if method == "search" else (1.0,):
        half = (hi - lo) / 2 * s
        scale = half / 7.5
        zero = (hi + lo) / 2 - half + 8 * scale
        for step in range(REFINE_STEPS + 1 if method == "search" else 1):
            scale, zero = round_params(scale, zero, dtype)
            q = codes_int4(g, scale, zero).float() - 8
            err = (((q * scale[..., None] + zero[..., None] - g) ** 2) * imp).sum(-1)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = tuple(torch.where(better, new, old)
                             for new, old in zip((err, scale, zero), best))
            if step < REFINE_STEPS:  # weighted least squares of g ~ scale * q + zero
                qm, gm = (q * imp).sum(-1) / n, (g * imp).sum(-1) / n
                dq = (q - qm[..., None]) * imp
                var = (dq * (q - qm[..., None])).sum(-1)
                cov = (dq * (g - gm[..., None])).sum(-1)
                scale = torch.where(var > 0, cov / var.clamp(min=1e-30), scale)
                zero = gm - scale * qm
    return best[1], best[2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> codes uint8 [out, in]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


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


def dequantize_int4(packed, scale, zero, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    q = q.reshape(out_f, in_f // group_size, group_size)
    w = (q - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(out_f, in_f)


class Int4Linear(nn.Module):
    kind = "int4"
    backend = "reference"  # or "tinygemm" (CUDA: PyTorch's _weight_int4pack_mm)
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
    def from_linear(cls, lin: nn.Linear, group_size: int = 128, method: str = "search",
                    codes: tuple | None = None, **_) -> Int4Linear:
        """``method``: see ``quantize_int4``; ``codes`` = (packed, scale, zero) from a method
        that needs more than the weight (GPTQ)."""
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, group_size,
                w.device)
        packed, scale, zero = codes or quantize_int4(w, group_size, method=method)
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
        return F.pad(x, (0, extra)) if extra else x

    def set_backend(self, backend: str) -> None:
        if backend not in ("reference", "tinygemm"):
            raise ConfigError(f"int4 backend {backend!r} is not one of reference, tinygemm")
        self._tinygemm = None
        if backend == "tinygemm":
            if not self.weight.is_cuda:
                raise ConfigError("the tinygemm int4 backend needs the model on CUDA")
            self._tinygemm = to_tinygemm(self.weight, self.scale, self.zero)
        self.backend = backend

    def forward(self, x):
        if self.backend == "tinygemm":
            w, szs = self._tinygemm
            y = torch.ops.aten._weight_int4pack_mm(self._pad(x.to(torch.bfloat16)), w,
                                                   self.group_size, szs)
            y = y.to(x.dtype)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 g{self.group_size}"
