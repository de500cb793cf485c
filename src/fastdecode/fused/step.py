"""The fused decode step: one token through the model as a fixed list of Triton launches
over static buffers (no torch.compile), with ``greedy_step``'s contract
(:mod:`fastdecode.compile`) so it can be captured as one CUDA graph.

The launches per layer, the two-stream layouts and the options are described in docs/gpu.md
("What the fast path is"); launch parameters come from :mod:`fastdecode.fused.tune`, every
option from one :class:`FusedOptions`. The weights are the model's own, in the layout of
:mod:`fastdecode.quant.layout`: the step holds no copy.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..cache.base import KVCache
from ..errors import ConfigError
from ..quant.layout import FLOAT, INT4, INT8, LayerWeights, Packed, ensure_layout, pack
from . import tune
from .options import FusedOptions
from .scored import ScoredArgs

NORM_LAYER, NORM_RMS = 1, 2


def unsupported_reason(decoder) -> str | None:
    """Why the fused step cannot run this decoder, or None if it can."""
    from torch import nn

    from ..quant.int4 import Int4Linear
    from ..quant.int8 import Int8Linear

    m = decoder.model
    kinds = (nn.Linear, Int8Linear, Int4Linear)
    for name, mod in m.named_modules():
        linear = name.endswith(("qkv", "out", "up", "down")) or name == "lm_head"
        if linear and not isinstance(mod, kinds):
            return f"{name} is a {type(mod).__name__}"
        if isinstance(mod, Int4Linear) and mod.padded_in != mod.in_features:
            return f"{name} is int4 with its input padded ({mod.in_features} -> {mod.padded_in})"
    if m.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {m.dtype}"
    return None


def choose_branches(model, opts: FusedOptions) -> int:
    """How a parallel-residual layer splits over two streams: the whole MLP beside attention
    (2) or its up projection only (1), the faster of the two
    (perf/results/h100-fused-ab-branches-1v2*.json); ``opts.branches`` pins it."""
    if not model.spec.parallel_residual:
        return 0
    if opts.branches is not None:
        return opts.branches
    layer = model.layers[0]
    out, down = pack(layer.attn.out), pack(layer.mlp.down)
    if down.fmt == INT8 or out.fmt != down.fmt:
        return 2
    mma = down.fmt == INT4 and tune.int4_paths(down, down.n, down.n, model.dtype, opts) == (2,)
    return 2 if mma else 1


def choose_priority(model, branches: int, opts: FusedOptions) -> bool:
    """Whether the main chain runs at a higher stream priority than the side branch: beside
    an int8 MLP (perf/results/h100-fused-ab-priority-*.json); ``opts.priority`` pins it."""
    if opts.priority is not None:
        return opts.priority
    return branches == 2 and pack(model.layers[0].mlp.down).fmt == INT8


class FusedStep:
    """``step(tok, pos) -> logits`` for one decoder (its model, cache and buffers)."""

    def __init__(self, decoder, options: FusedOptions | None = None):
        self.opts = opts = options if options is not None else FusedOptions()
        reason = unsupported_reason(decoder)
        if reason:
            raise ConfigError(f"the fused decode step does not support this model: {reason}")
        model, cache, spec = decoder.model, decoder.cache, decoder.model.spec
        self.model, self.cache, self.spec = model, cache, spec
        dev, dt = model.device, model.dtype
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.HQ, self.HKV, self.D = H, Hkv, D
        self.n_qkv = (H + 2 * Hkv) * D
        self.hd = H * D
        inter = spec.intermediate_size
        # parallel residual: the MLP apart from q/k/v (1: its up projection, 2: all of it),
        # on a side stream on CUDA
        self.branches = choose_branches(model, opts)
        self.side = torch.cuda.Stream(dev) if self.branches and dev.type == "cuda" else None
        # captured at a higher priority than the side branch (compile.CompiledStep)
        self.priority = self.side is not None and choose_priority(model, self.branches, opts)
        self.layers: list[LayerWeights] = ensure_layout(model, self.branches < 2).layers
        self.norm_kind = NORM_LAYER if spec.norm == "layer" else NORM_RMS
        fb = getattr(model.norm, "bias", None)
        self.final_norm = (model.norm.weight.detach()[None],  # [1, K]: one segment
                           fb.detach()[None] if fb is not None else None)
        self.head = pack(model.lm_head)
        # Static buffers: residual stream, [qkv | attention out | MLP activation], rotated
        # queries (window, sink), attention partials, cos/sin, logits.
        self.x = torch.empty(spec.hidden_size, dtype=dt, device=dev)
        self.mlp_y = torch.empty(spec.hidden_size, dtype=dt, device=dev)  # branches 2
        self.xn = torch.empty(2, spec.hidden_size, dtype=dt, device=dev)  # normalised x
        self.buf = torch.empty(self.n_qkv + self.hd + inter, dtype=dt, device=dev)
        self.q = torch.empty(2, H, D, dtype=dt, device=dev)
        self.logits = torch.empty(spec.vocab_size, dtype=dt, device=dev)
        self.slots = cache.slots
        splits = tune.max_splits(cache.slots)  # the tuner picks how many it uses
        self.m = torch.empty(H, splits, dtype=torch.float32, device=dev)
        self.l = torch.empty(H, splits, dtype=torch.float32, device=dev)
        self.acc = torch.empty(H, splits, D, dtype=torch.float32, device=dev)
        self.half = spec.rotary_dim // 2
        self.cs = torch.empty(4, self.half, dtype=torch.float32, device=dev)  # cos/sin x2
        self.plan_mask = self.plan_slot = None  # the plan kernel's outputs, if it applies
        self.scored = None  # score-based caches: sinks are plain held keys there
        self.sink = 0 if getattr(cache, "score_based", False) else cache.sink
        if getattr(cache, "score_based", False):
            self.scored = ScoredArgs(cache, H, model.freqs)
            # visibility is per KV head (cache.pos); this all-ones mask only serves the
            # plain kernels the tuner times
            self.plan_mask = torch.ones(cache.slots, dtype=torch.int8, device=dev)
        elif type(cache).plan_decode is KVCache.plan_decode:
            self.plan_mask = torch.empty(cache.slots, dtype=torch.int8, device=dev)
            self.plan_slot = torch.empty(1, dtype=torch.int64, device=dev)
        self.d0 = 1 << (D.bit_length() - 1)
        rest = D - self.d0
        # Second chunk of the head dim (80 = 64 + 16); a power-of-two head dim still gets a
        # one-lane chunk, fully masked, since Triton has no empty ranges.
        self.d1 = 1 if rest == 0 else 1 << (rest - 1).bit_length()
        self.kv_int8 = cache.storage.k.dtype == torch.int8
        st = cache.storage
        self.kv = (st.k, st.v, getattr(st, "k_scale", st.k), getattr(st, "v_scale", st.v))
        self.scale = 1.0 / math.sqrt(D)
        self.eps = spec.norm_eps
        self.norm_in_gemv = opts.norm_in_gemv
        # scratch of GEMVs cut into input parts (int4 on tensor cores): one a stream
        rows = max(self.n_qkv + inter, spec.hidden_size, spec.vocab_size)
        self.ws_main = tune.Workspace(rows, dev)
        self.ws_side = tune.Workspace(rows, dev) if self.side is not None else self.ws_main

    # ------------------------------------------------------------------ launches
    def _gemv(self, p: Packed, x, y, *, nsplit=None, gap=0, xseg=0, act2=0, glu=False,
              res=None, norm=None, res2=None, side=False):
        """A GEMV launch; ``side``: on the side stream, with its own workspace."""
        n = p.n // 2 if glu else p.n
        tune.gemv(x, p, y, res, n=n, nsplit=n if nsplit is None else nsplit, opts=self.opts,
                  gap=gap, xseg=xseg, act2=act2, glu=glu, norm=norm, res2=res2,
                  ws=self.ws_side if side else self.ws_main)

    def _normed(self, norms, *packs: Packed) -> list[dict]:
        """The input arguments of GEMVs reading norm(x): the norm inside each float GEMV,
        else one norm launch into ``xn``
        (experiments/results/h100-fused-ab-norm_in_gemv-6d5352a.json)."""
        if self.norm_in_gemv == 2 or (self.norm_in_gemv == 1 and
                                      all(p.fmt == FLOAT for p in packs)):
            return [{"x": self.x, "xseg": 0,
                     "norm": (self.norm_kind, norms[0], norms[1], self.eps)}] * len(packs)
        tune.norm(self.x, norms[0], norms[1], self.xn, self.norm_kind, norms[0].shape[0],
                  self.eps, self.opts)
        return [{"x": self.xn, "xseg": self.spec.hidden_size}] * len(packs)

    def _attention(self, i: int, plan_mask, slot) -> None:
        k, v, ks, vs = self.kv
        tune.rope_write(self.buf, self.q, self.cs, slot, k, v, ks, vs, i, self.slots, self.HQ,
                        self.HKV, self.D, self.half, self.sink > 0, self.kv_int8,
                        self.opts, scored=self.scored)
        tune.attention(self.q, k, v, ks, vs, plan_mask, self.m, self.l, self.acc,
                       self.buf[self.n_qkv:self.n_qkv + self.hd], i, self.slots, self.HQ,
                       self.HKV, self.D, self.d0, self.d1, self.sink, self.kv_int8,
                       self.scale, self.opts, scored=self.scored)

    def _fork(self):
        """Launches inside go to the side stream, after everything so far (CPU: in order)."""
        if self.side is None:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.side)

    def _join(self) -> None:
        """Launches from here on wait for the side stream's work too."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)

    def _layer(self, i: int, lw: LayerWeights, mask, slot) -> None:
        x, buf, nq, hd = self.x, self.buf, self.n_qkv, self.hd
        attn_out, act = buf[nq:nq + hd], buf[nq + hd:]
        if self.spec.parallel_residual:  # LayerNorm 1 and 2 of the same x
            if self.branches:  # the MLP (or its up projection) beside q/k/v -> attention
                iq, iu = self._normed(lw.norms, lw.qkv, lw.up)
                with self._fork():
                    self._gemv(lw.up, y=act, nsplit=0, act2=1, side=True, **iu)
                    if self.branches == 2:
                        self._gemv(lw.down, act, self.mlp_y, side=True)
                self._gemv(lw.qkv, y=buf, **iq)
                self._attention(i, mask, slot)
                self._join()
                if self.branches == 2:  # x + attention + MLP, rounded after each add
                    self._gemv(lw.out, attn_out, x, res=x, res2=self.mlp_y)
                    return
            else:
                if lw.a is not None:  # [qkv; up]: rows >= nq take LayerNorm 2 and GELU
                    inp, = self._normed(lw.norms, lw.a)
                    self._gemv(lw.a, y=buf, nsplit=nq, gap=hd, act2=1, **inp)
                else:
                    iq, iu = self._normed(lw.norms, lw.qkv, lw.up)
                    self._gemv(lw.qkv, y=buf, **iq)
                    self._gemv(lw.up, y=act, nsplit=0, act2=1, **iu)
                self._attention(i, mask, slot)
            if lw.b is not None:  # [out | down] over [attention out | activation]
                self._gemv(lw.b, buf[nq:], x, res=x)
            else:
                self._gemv(lw.out, attn_out, x, res=x)
                self._gemv(lw.down, act, x, res=x)
            return
        self._gemv(lw.qkv, y=buf, **self._normed(lw.norms, lw.qkv)[0])
        self._attention(i, mask, slot)
        self._gemv(lw.out, attn_out, x, res=x)
        n2 = (lw.norms[0][1:], lw.norms[1][1:] if lw.norms[1] is not None else None)
        self._gemv(lw.up, y=act, glu=True, **self._normed(n2, lw.up)[0])
        self._gemv(lw.down, act, x, res=x)

    def _plan(self, pos: torch.Tensor):
        """(visibility mask int8 [slots], the new token's slot), cos/sin into ``cs``."""
        if self.plan_slot is not None:
            tune.decode_plan(pos, self.cache, self.model.freqs, self.cs, self.plan_mask,
                             self.plan_slot, self.model.dtype, self.opts)
            return self.plan_mask, self.plan_slot
        if self.scored is not None:  # the slots: the cache's free [layers, KV heads]
            off = self.cache.position_offset
            q = pos + off if off else pos  # plan_decode's q_pos, without a launch at 0
            tune.cos_sin(q, q, self.model.freqs, self.cs, self.model.dtype, self.opts)
            self.scored.t = pos
            return self.plan_mask, self.scored.free
        plan = self.cache.plan_decode(pos)
        sink_pos = plan.q_pos_sink if plan.q_pos_sink is not None else plan.q_pos
        tune.cos_sin(plan.q_pos, sink_pos, self.model.freqs, self.cs, self.model.dtype,
                     self.opts)
        return plan.mask.reshape(-1).view(torch.int8), plan.decode_slot

    @torch.no_grad()
    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask, slot = self._plan(pos)
        torch.index_select(self.model.embed.weight, 0, tok, out=self.x.view(1, -1))
        for i, lw in enumerate(self.layers):
            self._layer(i, lw, mask, slot)
        if self.scored is not None:  # every layer's eviction, beside the head GEMV
            with self._fork():
                self.scored.evict(self.opts)
        self._gemv(self.head, y=self.logits, **self._normed(self.final_norm, self.head)[0])
        tune.argmax(self.logits, tok, pos, self.opts)  # tok = argmax, pos += 1
        if self.scored is not None:
            self._join()
        return self.logits


__all__ = ["FusedStep", "FusedOptions", "choose_branches", "unsupported_reason"]
