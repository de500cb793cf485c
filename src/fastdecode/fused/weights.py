"""The model's linears in the layout the fused GEMV reads, without a second copy.

Batch-1 decode reads every weight once per token, so fewer, larger GEMVs run closer to the
memory bandwidth. GPT-NeoX's parallel residual feeds q/k/v and the MLP's up projection the
same x, and sums the attention output projection and the MLP's down projection into the
same residual; so per layer ``qkv`` and ``up`` are stacked by rows (one GEMV over
[3HD + I] rows) and ``out`` and ``down`` side by side along the input (one GEMV over
[HD + I] inputs). The stacked tensors are built once and the model's own modules are then
re-pointed at views of them (``tensor.data = view``), so memory holds one copy, the eager
path keeps working on the same numbers, and an in-place weight update reaches both.

Quantized linears stack too when their formats agree: int8 scales are per row, so rows
stack as they are; side by side, each input range keeps its own row scale, stored as group
scales (group = gcd of the two widths). int4 groups stack either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.int4 import Int4Linear
from ..quant.int8 import Int8Linear

FLOAT, INT8, INT4 = 0, 1, 2


@dataclass
class Packed:
    """One GEMV's weight: ``w`` [N, K] (int4: uint8 [N, K/2]); ``s``/``z`` [N, K/group]
    (int8: scales only); ``bias`` float32 [N] or None."""

    fmt: int
    w: torch.Tensor
    s: torch.Tensor | None
    z: torch.Tensor | None
    group: int
    bias: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.w.shape[0]

    @property
    def k(self) -> int:
        return self.w.shape[1] * (2 if self.fmt == INT4 else 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.s, self.z) if t is not None)


def pack(mod: nn.Module) -> Packed:
    """A linear module as a Packed weight: tensors of its own over the module's memory
    (``detach``), so that when another layout later re-points the module at a new stack,
    this Packed (and a CUDA graph captured over it) keeps the memory it was built on alive
    and unchanged."""
    b = mod.bias.detach().float() if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, Int8Linear):
        return Packed(INT8, mod.weight.detach(), mod.scale.detach().reshape(-1, 1), None,
                      mod.in_features, b)
    if isinstance(mod, Int4Linear):
        return Packed(INT4, mod.weight.detach(), mod.scale.detach(), mod.zero.detach(),
                      mod.group_size, b)
    if isinstance(mod, nn.Linear):
        return Packed(FLOAT, mod.weight.detach(), None, None, mod.in_features, b)
    raise TypeError(f"cannot pack {type(mod).__name__}")


def can_stack_rows(a: Packed, b: Packed) -> bool:
    return (a.fmt == b.fmt and a.k == b.k and a.w.dtype == b.w.dtype
            and (a.fmt != INT4 or a.group == b.group) and (a.bias is None) == (b.bias is None))


def can_stack_cols(a: Packed, b: Packed) -> bool:
    return (a.fmt == b.fmt and a.n == b.n and a.w.dtype == b.w.dtype
            and (a.fmt != INT4 or a.group == b.group))


def _rebind(mods_and_views) -> None:
    for t, view in mods_and_views:
        t.data = view


def stack_rows(ma: nn.Module, mb: nn.Module) -> Packed:
    """[a; b] by rows; ``ma``/``mb`` are re-pointed at views of the result."""
    a, b = pack(ma), pack(mb)
    na = a.n
    w = torch.cat((a.w, b.w))
    s = torch.cat((a.s, b.s)) if a.s is not None else None
    z = torch.cat((a.z, b.z)) if a.z is not None else None
    bias = torch.cat((a.bias, b.bias)) if a.bias is not None else None
    pairs = [(ma.weight, w[:na]), (mb.weight, w[na:])]
    if a.fmt == INT8:
        pairs += [(ma.scale, s[:na, 0]), (mb.scale, s[na:, 0])]
    elif a.fmt == INT4:
        pairs += [(ma.scale, s[:na]), (mb.scale, s[na:]), (ma.zero, z[:na]), (mb.zero, z[na:])]
    _rebind(pairs)
    return Packed(a.fmt, w, s, z, a.group, bias)


def stack_cols(ma: nn.Module, mb: nn.Module) -> Packed:
    """[a | b] along the input; the biases are summed (the two outputs are summed)."""
    a, b = pack(ma), pack(mb)
    ka = a.w.shape[1]
    w = torch.cat((a.w, b.w), dim=1)
    pairs = [(ma.weight, w[:, :ka]), (mb.weight, w[:, ka:])]
    s = z = None
    group = a.group
    if a.fmt == INT8:
        group = math.gcd(a.k, b.k)
        s = torch.cat((a.s.expand(-1, a.k // group), b.s.expand(-1, b.k // group)), dim=1)
    elif a.fmt == INT4:
        ga = a.s.shape[1]
        s, z = torch.cat((a.s, b.s), dim=1), torch.cat((a.z, b.z), dim=1)
        pairs += [(ma.scale, s[:, :ga]), (mb.scale, s[:, ga:]), (ma.zero, z[:, :ga]),
                  (mb.zero, z[:, ga:])]
    _rebind(pairs)
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = (a.bias if a.bias is not None else 0) + (b.bias if b.bias is not None else 0)
    return Packed(a.fmt, w, s.contiguous() if s is not None else None, z, group, bias)


@dataclass
class LayerWeights:
    """A layer's GEMVs. ``qkv`` and ``up``: always, each alone (row views of ``a`` when it
    exists). NeoX, where the formats allow: ``a`` = [qkv; up] stacked by rows and ``b`` =
    [out | down] side by side; ``out`` and ``down`` are set only when ``b`` is not (their
    views of ``b`` are not row-contiguous, so they are not GEMV operands)."""

    qkv: Packed | None = None
    up: Packed | None = None
    a: Packed | None = None
    out: Packed | None = None
    down: Packed | None = None
    b: Packed | None = None
    norms: tuple[torch.Tensor, torch.Tensor | None] = None  # ([2, K] weight, [2, K] bias)


def _norm_params(n1: nn.Module, n2: nn.Module):
    w = torch.stack((n1.weight.detach(), n2.weight.detach()))
    b = (torch.stack((n1.bias.detach(), n2.bias.detach()))
         if getattr(n1, "bias", None) is not None else None)
    return w, b


def unstack(mod: nn.Module) -> None:
    """Give a linear whose tensors are views into a side-by-side stack contiguous tensors
    of its own again (a copy; nothing for tensors already contiguous)."""
    ts = [mod.weight] + ([mod.scale, mod.zero] if isinstance(mod, Int4Linear) else [])
    _rebind([(t, t.detach().contiguous()) for t in ts if not t.is_contiguous()])


def layer_weights(model, side_by_side: bool = True) -> list[LayerWeights]:
    """Per layer, the packed GEMVs (built once per model, module set and layout; cached on
    it). ``side_by_side=False``: ``out`` and ``down`` apart (the MLP on its own stream)."""
    cached = getattr(model, "_fused_weights", None)
    if cached is not None and cached[0] == (_layout_key(model), side_by_side):
        return cached[1]
    out = []
    with torch.no_grad():
        for layer in model.layers:
            lw = LayerWeights(norms=_norm_params(layer.norm1, layer.norm2))
            qkv, o, up, down = layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down
            if model.spec.parallel_residual and can_stack_rows(pack(qkv), pack(up)):
                lw.a = stack_rows(qkv, up)
            if (side_by_side and model.spec.parallel_residual
                    and can_stack_cols(pack(o), pack(down))):
                lw.b = stack_cols(o, down)
            else:
                unstack(o)
                unstack(down)
                lw.out, lw.down = pack(o), pack(down)
            lw.qkv, lw.up = pack(qkv), pack(up)  # after stacking: views of a's rows
            out.append(lw)
    model._fused_weights = ((_layout_key(model), side_by_side), out)  # after re-pointing
    return out


def _layout_key(model) -> tuple:
    """Where each linear's weight lives. Not module ids: CPython reuses them once a
    replaced module is freed."""
    return tuple((type(m).__name__, m.weight.data_ptr(), tuple(m.weight.shape))
                 for layer in model.layers
                 for m in (layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down))
