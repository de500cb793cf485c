"""Refresh: StreamingLLM's sinks + window, plus ``refresh`` slots that every ``refresh_every``
tokens are refilled from the tokens evicted since (issue 23; the position rule and a worked
example: docs/eviction.md; the oracle: :mod:`fastdecode.reference.refresh`).

Layout per layer and KV head: ``[S sinks | ring of W + E | B refresh slots]`` (E =
``refresh_every``, strict eviction). The ring holds the window and, behind it, the E tokens
evicted last, which are exactly the candidates of the next refresh: no second buffer and no
copy on eviction. A refresh happens at the start of step ``t`` when ``m = t - S - W`` (tokens
evicted so far) is a positive multiple of E: B of the candidates ``t-W-E .. t-W-1`` are
chosen (``uniform``: a fixed stride; ``score``: the highest attention received while in the
window, per KV head, as H2O accumulates it) and copied into the refresh slots, replacing
the previous ones. All of it is tensor arithmetic on static buffers gated by a device-side
flag: no host sync, the same shapes every step (torch.compile and CUDA graphs take it).

Positions. The held set in text order is sinks, refreshed tokens, window. ``absolute``: keys
stay rotated at their text position and the query scores everything at its own. ``cache``
(every held key at its rank, as a re-rotating cache would): refreshed keys are rotated
once more when copied, to their rank ``S + i``, and are scored like the sinks by the
query rotated at its own rank ``min(t, S) + B + window held`` (the sink query). int8 keys
are dequantized, rotated and re-quantized on that copy (one extra rounding).

Prefill is exact (the state and logits of feeding token by token): chunks are cut at the
refresh points (:meth:`prefill_limit`), and a chunk's attention adds its column sums to
the scores. The fused Triton step does not run this policy (``--kernels inductor``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import rope
from .base import KVCache, Plan
from .policy import PolicyConfig, option
from .storage import KV, quantize_int8

SELECTS = ("uniform", "score")


class RefreshCache(KVCache):
    needs_rotary = True  # make_cache passes rotary_dim and rope_theta
    fused = False  # compile.resolve_kernels: the fused step does not run this policy

    def __init__(self, cfg: RefreshConfig, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, rotary_dim: int, rope_theta: float, **shape):
        S, W, E, B = cfg.sink, cfg.window, cfg.refresh_every, cfg.refresh
        super().__init__(cfg, sink=S, window=W, compress_every=1, num_layers=num_layers,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, ring=W + E, tail=B,
                         **shape)
        self.every, self.refresh, self.select = E, B, cfg.refresh_select
        self.dtype = shape.get("dtype", torch.float32)
        dev = self._sink_ar.device
        self.freqs = rope.inv_freq(rotary_dim, rope_theta, device=dev)
        slots = torch.arange(self.slots, device=dev)
        self._is_sink = (slots < S) | (slots >= S + self.ring)  # scored by the sink query
        self._cand_ar = torch.arange(E, device=dev)
        self._stride = ((torch.arange(B, device=dev) * 2 + 1) * E) // (2 * B)  # centred
        self._dst = S + self.ring + torch.arange(B, device=dev)
        self._heads = torch.arange(num_kv_heads, device=dev)[:, None]
        self._layer_idx = torch.arange(num_layers, device=dev)
        # text positions in the refresh slots (-1: none yet); attention received per slot
        self.rpos = torch.full((num_layers, num_kv_heads, B), -1, dtype=torch.long,
                               device=dev)
        self.score = (torch.zeros(num_layers, num_kv_heads, self.slots, device=dev)
                      if self.select == "score" else None)

    # ----- arithmetic -----------------------------------------------------------------
    def _live(self, t):
        """Whether the refresh slots are filled at step ``t`` (a refresh has happened)."""
        return t - self.sink - self.window >= self.every

    def _query_bounds(self, ti: torch.Tensor):
        lo, pos_sink = super()._query_bounds(ti)
        if self.position_mode == "cache":  # the query's rank counts the refreshed tokens
            pos_sink = pos_sink + self.refresh * self._live(ti).long()
        return lo, pos_sink

    def prefill_limit(self, t0: int) -> int:
        m = t0 - self.sink - self.window
        return self.every - m % self.every if m >= 0 else self.every - m

    def keys_attended(self, t: torch.Tensor) -> torch.Tensor:
        """Keys step ``t`` attends to, itself included (for ppl's kv_len)."""
        held = self.window_held(torch.clamp(t - self.sink, min=0))
        return (torch.clamp(t, max=self.sink) + held + 1
                + self.refresh * self._live(t).long())

    def _plan(self, ti: torch.Tensor, keys_j: torch.Tensor, live) -> Plan:
        lo, pos_sink = self._query_bounds(ti)
        mask = self._mask(keys_j, ti, lo)
        n = self.sink + self.ring
        refresh_cols = torch.as_tensor(live, device=ti.device).reshape(-1, 1)
        mask = torch.cat((mask[:, :n], refresh_cols.expand(ti.numel(), self.refresh),
                          mask[:, n:]), 1)
        return Plan(q_pos=ti + self.position_offset, q_pos_sink=pos_sink, mask=mask,
                    key_is_sink=None, memo={"t": ti[:1]})

    # ----- the interface the model uses ------------------------------------------------
    def plan_prefill(self, t0: int, T: int) -> Plan:
        assert T <= self.prefill_limit(t0), "Decoder.prefill cuts chunks at refresh points"
        dev = self._sink_ar.device
        ti = torch.arange(t0, t0 + T, device=dev)
        keys_j = torch.cat((self._slot_tokens(t0 - 1), ti))
        plan = self._plan(ti, keys_j, self._live(t0))
        sink_j = (keys_j >= 0) & (keys_j < self.sink)
        plan.key_is_sink = torch.cat((sink_j[:-T], self._is_sink[-self.refresh:], sink_j[-T:]))
        keep = (ti < self.sink) | (ti >= t0 + T - self.ring)
        plan.write_src = torch.nonzero(keep).flatten()
        plan.write_dst = self.slot_of(ti[plan.write_src])
        m = t0 - self.sink - self.window
        plan.memo["now"] = m > 0 and m % self.every == 0  # host ints: no sync
        return plan

    def plan_decode(self, t: torch.Tensor) -> Plan:
        plan = self._plan(t, self._slot_tokens(t[0]), self._live(t))
        plan.key_is_sink = self._is_sink
        plan.decode_slot = self.slot_of(t)
        m = t - self.sink - self.window
        plan.memo["now"] = (m > 0) & (torch.remainder(m, self.every) == 0)  # on the device
        return plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> KV:
        st, now = self.storage, plan.memo["now"]
        if plan.decode_slot is not None:
            self._refresh(layer, plan.memo["t"], now)
            st.write(layer, plan.decode_slot, k, v)
            kv = st.read(layer)
            if self.score is not None:
                self.score[self._layer_idx[layer:layer + 1], :, plan.decode_slot] = 0.0
                kv = kv._replace(observe=functools.partial(self._observe, layer, None))
            return kv
        if now:
            self._refresh(layer, plan.memo["t"], None)
        new = st.encode(k, v)
        kv = st.concat(st.read(layer), new)
        st.write_encoded(layer, plan.write_dst, new, plan.write_src)
        if self.score is not None:
            kv = kv._replace(observe=functools.partial(self._observe, layer, plan))
        return kv

    def _observe(self, layer: int, plan: Plan | None, probs: torch.Tensor) -> None:
        """Add what every key received from the queries (summed over the group's query
        heads) to its slot's score; a prefill chunk's stored tokens start at their own."""
        got = probs.sum((1, 2))  # [Hkv, Nk]
        li = self._layer_idx[layer:layer + 1]
        self.score[li] += got[None, :, :self.slots]
        if plan is not None:
            self.score[li, :, plan.write_dst] = got[:, self.slots + plan.write_src].T

    def _refresh(self, layer: int, t: torch.Tensor, now) -> None:
        """Refill the refresh slots from the candidates ``t-W-E .. t-W-1`` (ring slots);
        ``now``: a device flag gating the write (decode), or None (prefill: refresh)."""
        S, C, B = self.sink, self.ring, self.refresh
        cand_pos = t - self.window - self.every + self._cand_ar  # [E], text order
        cand_slot = S + torch.remainder(cand_pos - S, C)
        Hkv = self._heads.shape[0]
        if self.select == "uniform":
            pick = self._stride[None].expand(Hkv, B)
        else:  # the B highest scores (ties: the older), kept in text order
            sc = self.score[layer][:, cand_slot]
            pick = torch.sort(torch.argsort(-sc, dim=1, stable=True)[:, :B], dim=1).values
        src, pos = cand_slot[pick], cand_pos[pick]  # [Hkv, B]
        st = self.storage
        int8 = st.k.dtype == torch.int8
        bufs = (st.k, st.v) + ((st.k_scale, st.v_scale) if int8 else ())
        new = [buf[layer][self._heads, src] for buf in bufs]
        if self.position_mode == "cache":  # to rank S + i, from text position pos
            k = new[0].float() * new[2][..., None] if int8 else new[0]
            ang = (S + self._cand_ar[:B] - pos).to(torch.float64)[..., None] * self.freqs
            k = rope.apply(k.double(), torch.cos(ang), torch.sin(ang))
            if int8:
                new[0], new[2] = quantize_int8(k)
            else:
                new[0] = k.to(new[0].dtype)
        li = self._layer_idx[layer:layer + 1]
        outs = list(zip(bufs + (self.rpos,), new + [pos]))
        for buf, x in outs:  # one index_put on each whole buffer (see storage._put)
            if now is not None:
                old = buf[layer] if buf is self.rpos else buf[layer][:, self._dst]
                x = torch.where(now.reshape((1,) * x.dim()), x, old)
            if buf is self.rpos:
                buf[li] = x[None]
            else:
                buf[li, :, self._dst] = x.transpose(0, 1)

    def reset(self) -> None:
        self.rpos.fill_(-1)
        if self.score is not None:
            self.score.zero_()

    def _state(self) -> list[torch.Tensor]:
        st = self.storage
        kv = [st.k, st.v] + ([st.k_scale, st.v_scale] if st.k.dtype == torch.int8 else [])
        return kv + [self.rpos] + ([self.score] if self.score is not None else [])

    def snapshot(self) -> list[torch.Tensor]:
        """All state, K/V too, for the warm-ups of a graph capture (compile.CompiledStep): a
        warm-up adds scores and may overwrite a refresh candidate's ring slot."""
        return [x.clone() for x in self._state()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        for x, saved in zip(self._state(), snap):
            x.copy_(saved)

    # ----- introspection (host side) ----------------------------------------------------
    def held_by_head(self, t: int) -> list[list[list[int]]]:
        """Text positions held after ``t`` tokens, ascending, per layer and KV head."""
        base = super().held_positions(t)
        sinks, window = base[:min(t, self.sink)], base[min(t, self.sink):]
        live = self._live(t - 1)
        return [[sinks + (sorted(row) if live else []) + window for row in layer]
                for layer in self.rpos.tolist()]

    def held_positions(self, t: int) -> list[int]:
        held = self.held_by_head(t)
        if any(h != held[0][0] for layer in held for h in layer):
            raise ValueError("the refresh cache (select=score) holds different tokens per "
                             "layer and KV head; use held_by_head()")
        return held[0][0]

    def bytes_per_token_read(self) -> int:
        extra = 0 if self.score is None else self.score.numel() * 4
        return self.storage.nbytes() + extra


@dataclass(frozen=True, kw_only=True)
class RefreshConfig(PolicyConfig):
    """``sink`` + ``window`` as streaming, plus ``refresh`` slots refilled every
    ``refresh_every`` tokens from the tokens evicted since; ``budget`` counts all three.
    The cache keeps ``refresh_every`` more slots (the candidates) than the budget."""

    policy = "refresh"
    cache_class = RefreshCache

    sink: int = option(4, "attention sinks kept (the first tokens, never evicted)", min=0)
    window: int = option(956, "most recent tokens kept", min=1)
    refresh: int = option(64, "refresh slots: evicted tokens re-admitted", min=1)
    refresh_every: int = option(256, "refill the refresh slots every N tokens, from the N "
                                "tokens evicted since", min=1)
    refresh_select: str = option("uniform", "which evicted tokens come back: uniform (a "
                                 "fixed stride) or score (most attention received)",
                                 choices=SELECTS)

    def check(self) -> None:
        if self.refresh > self.refresh_every:
            raise self._error(f"refresh ({self.refresh}) must be <= refresh_every "
                              f"({self.refresh_every}): the slots are refilled from the "
                              "tokens evicted in one period")

    @property
    def budget(self) -> int:
        return self.sink + self.window + self.refresh
