"""The model's linears in the layout the fused GEMV reads, as the model's own storage.

Batch-1 decode reads every weight once per token, so fewer, larger GEMVs run closer to the
memory bandwidth. GPT-NeoX's parallel residual feeds q/k/v and the MLP's up projection the
same x, and sums the attention output projection and the MLP's down projection into the
same residual; so per layer ``qkv`` and ``up`` are stacked by rows (one GEMV over
[3HD + I] rows) and ``out`` and ``down`` side by side along the input (one GEMV over
[HD + I] inputs).

Ownership (gpt-fast's load hook: the fused layout *is* the model's canonical layout): the
stacks are built here, once, from the model's weights, and handed to the model's one
documented method for it, :meth:`Transformer.adopt_layout`, which records the
:class:`Layout` in the attribute the model declares (``model.layout``) and lets its own
linears hold views of the stacks. So memory holds one copy, the eager path keeps computing
on the same numbers, and nothing outside the model touches its modules. The fused step only
reads ``model.layout`` (:func:`ensure_layout` builds it when absent or stale). This sits at
the quant layer because the stacking must know the int8/int4 storage formats.

A layout's tensors are its own (detached) objects: when a later layout re-stacks the model,
the earlier one (and a CUDA graph captured over it) keeps the memory it was built on, alive
and unchanged.

Quantized linears stack too when their formats agree: int8 scales are per row, so rows
stack as they are; side by side, each input range keeps its own row scale, stored as group
scales (group = gcd of the two widths). int4 groups stack either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .int4 import Int4Linear
from .int8 import Int8Linear

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

    def rows(self, lo: int, hi: int) -> Packed:
        """Rows [lo, hi) as views (bias: a slice of the float32 copy)."""
        sl = slice(lo, hi)
        return Packed(self.fmt, self.w[sl], self.s[sl] if self.s is not None else None,
                      self.z[sl] if self.z is not None else None, self.group,
                      self.bias[sl] if self.bias is not None else None)


def pack(mod: nn.Module) -> Packed:
    """A linear module as a Packed weight over the module's memory (tensors of its own,
    ``detach``: a later re-stacking of the module does not move them)."""
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


def stack_rows(a: Packed, b: Packed) -> tuple[Packed, dict, dict]:
    """[a; b] by rows, and for each input the views its module's tensors become."""
    na = a.n
    w = torch.cat((a.w, b.w))
    s = torch.cat((a.s, b.s)) if a.s is not None else None
    z = torch.cat((a.z, b.z)) if a.z is not None else None
    bias = torch.cat((a.bias, b.bias)) if a.bias is not None else None
    va, vb = {"weight": w[:na]}, {"weight": w[na:]}
    if a.fmt == INT8:
        va["scale"], vb["scale"] = s[:na, 0], s[na:, 0]
    elif a.fmt == INT4:
        va.update(scale=s[:na], zero=z[:na])
        vb.update(scale=s[na:], zero=z[na:])
    return Packed(a.fmt, w, s, z, a.group, bias), va, vb


def stack_cols(a: Packed, b: Packed) -> tuple[Packed, dict, dict]:
    """[a | b] along the input (the biases summed: the two outputs are summed), and the
    views the modules' tensors become."""
    ka = a.w.shape[1]
    w = torch.cat((a.w, b.w), dim=1)
    va, vb = {"weight": w[:, :ka]}, {"weight": w[:, ka:]}
    s = z = None
    group = a.group
    if a.fmt == INT8:
        group = math.gcd(a.k, b.k)
        s = torch.cat((a.s.expand(-1, a.k // group), b.s.expand(-1, b.k // group)), dim=1)
    elif a.fmt == INT4:
        ga = a.s.shape[1]
        s, z = torch.cat((a.s, b.s), dim=1), torch.cat((a.z, b.z), dim=1)
        va.update(scale=s[:, :ga], zero=z[:, :ga])
        vb.update(scale=s[:, ga:], zero=z[:, ga:])
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = (a.bias if a.bias is not None else 0) + (b.bias if b.bias is not None else 0)
    return Packed(a.fmt, w, s.contiguous() if s is not None else None, z, group, bias), va, vb


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


@dataclass
class Layout:
    """The fused step's weights of one model: per layer its GEMVs, whether [out | down]
    was stacked (``side_by_side``), and where the model's linears lived when it was built
    (``key``; a layout whose key no longer matches is stale)."""

    layers: list[LayerWeights]
    side_by_side: bool
    key: tuple


def _norm_params(n1: nn.Module, n2: nn.Module):
    w = torch.stack((n1.weight.detach(), n2.weight.detach()))
    b = (torch.stack((n1.bias.detach(), n2.bias.detach()))
         if getattr(n1, "bias", None) is not None else None)
    return w, b


def _own(mod: nn.Module) -> dict:
    """Contiguous tensors of its own for a linear whose tensors are views into a
    side-by-side stack (a copy; nothing for tensors already contiguous)."""
    names = ["weight"] + (["scale", "zero"] if isinstance(mod, Int4Linear) else [])
    return {n: getattr(mod, n).detach().contiguous() for n in names
            if not getattr(mod, n).is_contiguous()}


def layout_key(model) -> tuple:
    """Where each linear's weight lives. Not module ids: CPython reuses them once a
    replaced module is freed."""
    return tuple((type(m).__name__, m.weight.data_ptr(), tuple(m.weight.shape))
                 for layer in model.layers
                 for m in (layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down))


@torch.no_grad()
def build_layout(model, side_by_side: bool = True) -> Layout:
    """Stack the model's linears (see the module doc) and give the result to the model
    (``model.adopt_layout``): its linears then hold views of the stacks, and
    ``model.layout`` is the returned Layout. ``side_by_side=False``: ``out`` and ``down``
    apart (the MLP on its own stream)."""
    layers, views = [], {}
    for i, layer in enumerate(model.layers):
        lw = LayerWeights(norms=_norm_params(layer.norm1, layer.norm2))
        qkv, o, up, down = layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down
        names = {m: f"layers.{i}.{n}" for m, n in ((qkv, "attn.qkv"), (o, "attn.out"),
                                                  (up, "mlp.up"), (down, "mlp.down"))}

        def record(mod, vs, names=names):
            views.update({f"{names[mod]}.{k}": v for k, v in vs.items()})

        pq, pu, po, pd = pack(qkv), pack(up), pack(o), pack(down)
        if model.spec.parallel_residual and can_stack_rows(pq, pu):
            lw.a, vq, vu = stack_rows(pq, pu)
            record(qkv, vq)
            record(up, vu)
            lw.qkv, lw.up = lw.a.rows(0, pq.n), lw.a.rows(pq.n, lw.a.n)
        else:
            lw.qkv, lw.up = pq, pu
        if side_by_side and model.spec.parallel_residual and can_stack_cols(po, pd):
            lw.b, vo, vd = stack_cols(po, pd)
            record(o, vo)
            record(down, vd)
        else:
            own_o, own_d = _own(o), _own(down)
            record(o, own_o)
            record(down, own_d)
            lw.out = _with(po, own_o)
            lw.down = _with(pd, own_d)
        layers.append(lw)
    layout = Layout(layers, side_by_side, ())
    model.adopt_layout(layout, views)
    layout.key = layout_key(model)  # after the model re-arranged its storage
    return layout


def _with(p: Packed, own: dict) -> Packed:
    """``p`` with the tensors in ``own`` (contiguous copies) in place of its views."""
    return Packed(p.fmt, own.get("weight", p.w),
                  own["scale"] if "scale" in own else p.s,
                  own["zero"] if "zero" in own else p.z, p.group, p.bias)


def ensure_layout(model, side_by_side: bool = True) -> Layout:
    """``model.layout`` if it was built for these modules and ``side_by_side``, else a new
    one (:func:`build_layout`)."""
    have = model.layout
    if have is not None and have.side_by_side == side_by_side and have.key == layout_key(model):
        return have
    return build_layout(model, side_by_side)


__all__ = ["FLOAT", "INT8", "INT4", "Packed", "LayerWeights", "Layout", "pack",
           "build_layout", "ensure_layout", "layout_key", "can_stack_rows", "can_stack_cols"]
