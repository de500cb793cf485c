"""One lean decoder for every family, batch 1, built from the spec's switches (norm, MLP,
parallel or sequential residual, biases, partial rotary, GQA, tied head): GPT-NeoX and Llama
are two settings of these (:mod:`fastdecode.models.families`).

Parameter names are the canonical checkpoint names of loaders and quantizers: ``embed``,
``layers.{i}.norm1/norm2``, ``layers.{i}.attn.qkv`` (rows: q, k, v heads),
``layers.{i}.attn.out``, ``layers.{i}.mlp.up`` (gated: gate rows, then up), ``mlp.down``,
``norm``, ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import rope
from ..attention import attend, flash_prefill_enabled
from ..cache.base import KVCache, Plan
from .spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "layer":
        return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.has_bias)
    return RMSNorm(spec.hidden_size, spec.norm_eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        D = spec.head_dim
        self.qkv = nn.Linear(spec.hidden_size, (spec.num_heads + 2 * spec.num_kv_heads) * D,
                             bias=spec.has_bias)
        self.out = nn.Linear(spec.num_heads * D, spec.hidden_size, bias=spec.has_bias)

    def forward(self, x, layer: int, cache: KVCache, plan: Plan, rot, rot_sink,
                flash: bool = False):
        return self.out(self.context(x, layer, cache, plan, rot, rot_sink, flash))

    def context(self, x, layer: int, cache: KVCache, plan: Plan, rot, rot_sink,
                flash: bool = False):
        """The attention output before the output projection, [T, heads * head_dim]."""
        s = self.spec
        T, D = x.shape[0], s.head_dim
        qkv = self.qkv(x).view(T, s.num_heads + 2 * s.num_kv_heads, D)
        if flash:
            # Prefill on the flash path: keys rotated and laid out in one Triton pass, the
            # queries read raw from qkv and rotated inside the attention kernel, or with
            # "q-rope" in that pass too (prefill_rope's doc). (Imported here: Triton reads
            # TRITON_INTERPRET when a kernel is defined.)
            from ..kernels.prefill_rope import prefill_rope

            if flash == "q-rope":
                q, q_sink, k, v = prefill_rope(qkv, s.num_heads, s.num_kv_heads, rot,
                                               rot_sink, queries=True)
                rot = rot_sink = None  # already rotated
            else:
                k, v = prefill_rope(qkv, s.num_heads, s.num_kv_heads, rot)
                q, q_sink = qkv[:, :s.num_heads].transpose(0, 1), None
            o = attend(q, q_sink, cache.update(layer, k, v, plan), plan, cache.sink, True,
                       rot=rot, rot_sink=rot_sink)
            return o.transpose(0, 1).reshape(T, s.num_heads * D)
        q, k, v = qkv.transpose(0, 1).split((s.num_heads, s.num_kv_heads, s.num_kv_heads),
                                            dim=0)
        q_win = rope.apply(q, *rot)
        q_sink = rope.apply(q, *rot_sink) if rot_sink is not None else None
        k, v = rope.apply(k, *rot), v.contiguous()
        kv = cache.update(layer, k, v, plan)
        o = attend(q_win, q_sink, kv, plan, cache.sink, flash)
        return o.transpose(0, 1).reshape(T, s.num_heads * D)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gated = spec.mlp == "glu"
        width = spec.intermediate_size * (2 if self.gated else 1)
        self.up = nn.Linear(spec.hidden_size, width, bias=spec.has_bias)
        self.down = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.has_bias)

    def forward(self, x):
        return self.down(self.hidden(x))

    def hidden(self, x):
        """The activation before the down projection."""
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.index = index
        self.parallel = spec.parallel_residual
        self.norm1 = make_norm(spec)
        self.norm2 = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp = MLP(spec)

    def forward(self, x, cache, plan, rot, rot_sink, flash=False):
        if flash and self._fused_residual(x):
            return self._parallel_prefill(x, cache, plan, rot, rot_sink, flash)
        return self.residual(x, self.attn(self.norm1(x), self.index, cache, plan, rot,
                                          rot_sink, flash))

    def _fused_residual(self, x) -> bool:
        """Whether the flash prefill may take :meth:`_parallel_prefill`: a parallel block
        with LayerNorms and unquantized output projections in x's dtype."""
        out, down = self.attn.out, self.mlp.down
        return (self.parallel and isinstance(self.norm1, nn.LayerNorm)
                and isinstance(self.norm2, nn.LayerNorm) and type(out) is nn.Linear
                and type(down) is nn.Linear and out.weight.dtype == x.dtype
                and down.weight.dtype == x.dtype and (out.bias is None) == (down.bias is None))

    def _parallel_prefill(self, x, cache, plan, rot, rot_sink, flash=True):
        """:meth:`residual` (parallel) with both norms in one Triton pass that also writes
        x + both output biases, into which the projections add in place (``addmm_``: the
        GEMM reads it as C; an out-of-place addmm would copy it first): no separate
        LayerNorm, bias or residual passes over [T, hidden]."""
        from ..kernels.prefill_norm import dual_layer_norm  # Triton: imported when used

        out, down = self.attn.out, self.mlp.down
        rb = out.bias + down.bias if out.bias is not None else None
        h1, h2, r = dual_layer_norm(x, self.norm1, self.norm2, rb)
        a = self.attn.context(h1, self.index, cache, plan, rot, rot_sink, flash)
        r.addmm_(a, out.weight.t())
        return r.addmm_(self.mlp.hidden(h2), down.weight.t())

    def residual(self, x, a):
        """x plus the attention output ``a`` and the MLP (parallel or sequential)."""
        if self.parallel:
            return x + a + self.mlp(self.norm2(x))
        x = x + a
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = make_norm(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("freqs", rope.inv_freq(spec.rotary_dim, spec.rope_theta),
                             persistent=False)
        self.layout = None  # the fused step's stacked weights, once built (adopt_layout)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the float64 rotary frequencies too; rebuild them instead.
        super()._apply(fn, recurse)
        if self.spec.tie_embeddings:  # to_empty()/to() may untie; tie again
            self.lm_head.weight = self.embed.weight
        self.freqs = rope.inv_freq(self.spec.rotary_dim, self.spec.rope_theta,
                                   device=self.embed.weight.device)
        self.layout = None  # built over the tensors just replaced
        return self

    @torch.no_grad()
    def adopt_layout(self, layout, views: dict[str, torch.Tensor]) -> None:
        """Record ``layout`` (quant/layout.py) and let the tensors named in ``views`` (name
        -> a tensor of the same shape and dtype) live in its memory: one copy serves both."""
        targets = []
        for name, view in views.items():
            mod_name, _, attr = name.rpartition(".")
            t = getattr(self.get_submodule(mod_name), attr)
            if t.shape != view.shape or t.dtype != view.dtype:
                raise ValueError(f"{name}: a {tuple(view.shape)} {view.dtype} view for a "
                                 f"{tuple(t.shape)} {t.dtype} tensor")
            targets.append((t, view))
        for t, view in targets:
            t.data = view
        self.layout = layout

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, tokens: torch.Tensor, cache: KVCache, plan: Plan,
                rows: slice | torch.Tensor | None = None,
                prefill_kernel: str = "auto") -> torch.Tensor:
        """Logits [T, vocab] for ``tokens`` [T] at the positions ``plan`` gives; with
        ``rows`` (an index or slice of the T positions) only those rows reach the head;
        ``prefill_kernel``: see :func:`fastdecode.attention.flash_prefill_enabled`."""
        flash = (flash_prefill_enabled(prefill_kernel, self.device) and tokens.numel() > 1
                 and plan.key_pos is not None)
        if flash and prefill_kernel == "flash-q-rope":
            flash = "q-rope"  # truthy: the flash path, with the queries rotated first
        x = self.embed(tokens)
        rot = rope.cos_sin(plan.q_pos, self.freqs, x.dtype)
        rot_sink = (rope.cos_sin(plan.q_pos_sink, self.freqs, x.dtype)
                    if plan.q_pos_sink is not None else None)
        for layer in self.layers:
            x = layer(x, cache, plan, rot, rot_sink, flash)
        if rows is not None:
            x = x[rows]
        return self.lm_head(self.norm(x))

    def forward_batch(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, L, V] (``last_only``: [B, V]) of ``tokens`` [B, L], each row encoded
        from scratch at positions 0..L-1: :meth:`forward`'s arithmetic batched and without
        a cache, for the recompute oracle, calibration and distillation (autograd)."""
        spec = self.spec
        B, L = tokens.shape
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        x = self.embed(tokens.reshape(-1))  # [B*L, hidden]
        cos, sin = rope.cos_sin(torch.arange(L, device=tokens.device), self.freqs, x.dtype)
        rows = L
        for i, layer in enumerate(self.layers):
            last = last_only and i == len(self.layers) - 1
            h = layer.norm1(x)
            qkv = layer.attn.qkv(h).view(B, L, H + 2 * Hkv, D).transpose(1, 2)  # [B, heads, L, D]
            q, k, v = qkv.split((H, Hkv, Hkv), dim=1)
            k = rope.apply(k, cos, sin)
            if last:  # only the last query matters from here on
                q = rope.apply(q[:, :, -1:], cos[-1:], sin[-1:])
                x = x.view(B, L, -1)[:, -1].contiguous()
                rows = 1
            else:
                q = rope.apply(q, cos, sin)
            if Hkv != H:
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=not last)
            a = layer.attn.out(a.transpose(1, 2).reshape(B * rows, H * D))
            x = layer.residual(x, a)
        logits = self.lm_head(self.norm(x))
        return logits if last_only else logits.view(B, L, -1)

    def load_canonical(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load canonical tensors (see module doc), cast to this model's dtype."""
        from ..errors import ModelLoadError

        state, own = dict(state), self.state_dict()
        if self.spec.tie_embeddings:
            state.pop("lm_head.weight", None)
            own.pop("lm_head.weight", None)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ModelLoadError(f"checkpoint does not match the model: missing {missing[:5]}"
                                 f"{'...' if len(missing) > 5 else ''}, unexpected "
                                 f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, tensor in state.items():
            if name in own and tuple(own[name].shape) != tuple(tensor.shape):
                raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in state:
                    p.copy_(state[name].to(p.dtype))
