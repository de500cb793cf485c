"""The model's linears stacked in the layout the fused GEMV reads, adopted as the model's
own storage so memory holds one copy (docs/quant.md, the fused step's layout)."""

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
        """Rows [lo, hi) as views."""
        s, z, b = (t[lo:hi] if t is not None else None for t in (self.s, self.z, self.bias))
        return Packed(self.fmt, self.w[lo:hi], s, z, self.group, b)


def pack(mod: nn.Module) -> Packed:
    """A linear module as a Packed weight over its memory (detached: see the module doc)."""
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
    w, s, z, bias = (torch.cat((x, y)) if x is not None else None
                     for x, y in ((a.w, b.w), (a.s, b.s), (a.z, b.z), (a.bias, b.bias)))
    va, vb = {"weight": w[:na]}, {"weight": w[na:]}
    if a.fmt == INT8:
        va["scale"], vb["scale"] = s[:na, 0], s[na:, 0]
    elif a.fmt == INT4:
        va.update(scale=s[:na], zero=z[:na])
        vb.update(scale=s[na:], zero=z[na:])
    return Packed(a.fmt, w, s, z, a.group, bias), va, vb


def stack_cols(a: Packed, b: Packed) -> tuple[Packed, dict, dict]:
    """[a | b] along the input (biases summed, as the outputs are), and the views."""
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
    """A layer's GEMVs: ``qkv`` and ``up`` (row views of ``a`` = [qkv; up] when stacked);
    ``b`` = [out | down], or else ``out`` and ``down``."""
    qkv: Packed | None = None
    up: Packed | None = None
    a: Packed | None = None
    out: Packed | None = None
    down: Packed | None = None
    b: Packed | None = None
    norms: tuple[torch.Tensor, torch.Tensor | None] = None  # ([2, K] weight, [2, K] bias)


@dataclass
class Layout:
    """The fused step's weights of one model; stale once ``key`` no longer matches."""
    layers: list[LayerWeights]
    side_by_side: bool
    key: tuple


def _norm_params(n1: nn.Module, n2: nn.Module):
    w = torch.stack((n1.weight.detach(), n2.weight.detach()))
    b = (torch.stack((n1.bias.detach(), n2.bias.detach()))
         if getattr(n1, "bias", None) is not None else None)
    return w, b


def _own(mod: nn.Module) -> dict:
    """Contiguous copies of a linear's tensors that are views into a side-by-side stack."""
    names = ["weight"] + (["scale", "zero"] if isinstance(mod, Int4Linear) else [])
    return {n: getattr(mod, n).detach().contiguous() for n in names
            if not getattr(mod, n).is_contiguous()}


def layout_key(model) -> tuple:
    """Where each linear's weight lives (not module ids: CPython reuses those)."""
    return tuple((type(m).__name__, m.weight.data_ptr(), tuple(m.weight.shape))
                 for layer in model.layers
                 for m in (layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down))


@torch.no_grad()
def build_layout(model, side_by_side: bool = True) -> Layout:
    """Stack the model's linears and hand them to ``model.adopt_layout``;
    ``side_by_side=False`` keeps ``out`` and ``down`` apart (the MLP on its own stream)."""
    layers, views = [], {}
    for i, layer in enumerate(model.layers):
        lw = LayerWeights(norms=_norm_params(layer.norm1, layer.norm2))
        qkv, o, up, down = layer.attn.qkv, layer.attn.out, layer.mlp.up, layer.mlp.down
        names = {m: f"layers.{i}.{n}" for m, n in ((qkv, "attn.qkv"), (o, "attn.out"),
                                                  (up, "mlp.up"), (down, "mlp.down"))}

        def record(*pairs, names=names):  # (module, {tensor name: view})
            views.update({f"{names[m]}.{k}": v for m, vs in pairs for k, v in vs.items()})

        pq, pu, po, pd = pack(qkv), pack(up), pack(o), pack(down)
        if model.spec.parallel_residual and can_stack_rows(pq, pu):
            lw.a, vq, vu = stack_rows(pq, pu)
            record((qkv, vq), (up, vu))
            lw.qkv, lw.up = lw.a.rows(0, pq.n), lw.a.rows(pq.n, lw.a.n)
        else:
            lw.qkv, lw.up = pq, pu
        if side_by_side and model.spec.parallel_residual and can_stack_cols(po, pd):
            lw.b, vo, vd = stack_cols(po, pd)
            record((o, vo), (down, vd))
        else:
            own_o, own_d = _own(o), _own(down)
            record((o, own_o), (down, own_d))
            lw.out, lw.down = _with(po, own_o), _with(pd, own_d)
        layers.append(lw)
    layout = Layout(layers, side_by_side, ())
    model.adopt_layout(layout, views)
    layout.key = layout_key(model)  # after the model re-arranged its storage
    return layout


def _with(p: Packed, own: dict) -> Packed:
    """``p`` with the copies in ``own`` in place of its views."""
    return Packed(p.fmt, own.get("weight", p.w), own.get("scale", p.s), own.get("zero", p.z),
                  p.group, p.bias)


def ensure_layout(model, side_by_side: bool = True) -> Layout:
    """``model.layout`` if it is current for ``side_by_side``, else a new one."""
    have = model.layout
    if have is not None and have.side_by_side == side_by_side and have.key == layout_key(model):
        return have
    return build_layout(model, side_by_side)


__all__ = ["FLOAT", "INT8", "INT4", "Packed", "LayerWeights", "Layout", "pack",
           "build_layout", "ensure_layout", "layout_key", "can_stack_rows", "can_stack_cols"]
