"""int8 weight-only linear, symmetric per-output-channel scales; dequantized *before* the
matmul (scaling after overflows float16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def quantize_int8(w: torch.Tensor):
    """w [out, in] -> (int8 [out, in], float32 scale [out])."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(wf / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    kind = "int8"
    backend = "reference"  # or "inductor" (bfloat16: fuses under torch.compile, as torchao)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, **_) -> Int8Linear:
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device)
        q, scale = quantize_int8(w)
        m.weight.copy_(q)
        m.scale.copy_(scale.to(w.dtype))
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale)

    def set_backend(self, backend: str) -> None:
        if backend not in ("reference", "inductor"):
            raise ConfigError(f"int8 backend {backend!r} is not one of reference, inductor")
        self.backend = backend

    def forward(self, x):
        if self.backend == "inductor" and x.dtype == torch.bfloat16:
            # Scale after: torch.compile fuses a one-row input into one int8 reduction;
            # bfloat16 only (float16 could overflow before the scale).
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
            return y + self.bias if self.bias is not None else y
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"
