"""Score-based eviction (H2O, TOVA) on static buffers: the machinery both policies share.

Per layer and KV head: ``budget + 1`` slots of key/value storage (int8 or the model dtype),
and beside them on the device the text position of the token in each slot (``pos``, -1 when
empty), its score, and, for ``cache`` positions, how many held tokens are newer than it.
Which slot a token sits in carries no meaning, so each KV head may hold different tokens
and nothing is ever compacted.

A decode step, per layer: the new token overwrites the slot chosen at the end of the last
step (``free``); attention, masked per KV head by ``pos >= 0``, hands its probabilities to
``observe``, which updates the scores (H2O adds, TOVA replaces) and, once ``budget + 1``
tokens are held, frees the lowest (score, text position) slot among the evictable ones by a
device-side argmin: that slot is the next step's ``free``. Pure tensor arithmetic on fixed
shapes: no host sync, no Python-side growth (CUDA-graph safe). Between steps at most
``budget`` tokens are held.

A prefill chunk attends over [held slots, chunk] (the chunk causally), scores it as the
oracle does (:mod:`fastdecode.reference.scored`), evicts down to the budget by sorting, and
scatters the chunk's survivors into free slots (a data-dependent scatter: prefill only).

Positions. ``absolute``: keys are stored rotated at their text position (as every cache
stores them) and used as they are. ``cache`` (the authors' "position rolling": every key at
its rank among the held keys, the query at its own rank): the distance from the query to a
held key is the number of held tokens newer than it (``newer``, O(slots) a step); at read
time each stored key is rotated once more, by its target minus its text position, in
float64 (an extra pass over the keys, in the eager path; the fused step folds that angle
into its scores and runs this whole decode step, eviction included, in its own launches:
:class:`fastdecode.fused.scored.ScoredArgs`).
"""

from __future__ import annotations

import functools

import torch

from .. import rope
from ..errors import ConfigError, InputError
from .base import KVCache, Plan
from .policy import POSITION_MODES, option
from .storage import KV, STORAGES


def position_mode_option():
    """The ``position_mode`` option of score-based policies: ``absolute`` by default (the
    authors'), ``cache`` for their "position rolling"."""
    return option("absolute", "absolute: keys keep their text positions (the authors' "
                  "default); cache: keys at their rank in the cache (position rolling)",
                  choices=POSITION_MODES, label="position mode")


class ScoredCache(KVCache):
    """Slots, scores and per-head eviction; subclasses set the rule (``_new_scores``)."""

    name = "scored"
    needs_rotary = True  # make_cache passes rotary_dim and rope_theta
    score_based = True  # the fused step scores and evicts in its own kernels (step.py)
    rule = "sum"  # how the fused step updates scores: sum (H2O) or mean (TOVA)

    def __init__(self, cfg, *, budget: int, sink: int, recent: int, num_layers: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device="cpu", position_offset: int = 0, rotary_dim: int | None = None,
                 rope_theta: float | None = None):
        self.cfg = cfg
        self.position_offset = position_offset
        self.position_mode = cfg.position_mode
        self.budget, self.sink, self.recent = budget, sink, recent
        self.compress_every = 1
        self.slots = budget + 1
        self.num_kv_heads = num_kv_heads
        self.dtype = dtype
        shape = (num_layers, num_kv_heads, self.slots, head_dim)
        self.storage = STORAGES[cfg.kv_dtype](shape, dtype, device)
        self.pos = torch.full(shape[:-1], -1, dtype=torch.long, device=device)
        self.score = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.newer = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        self.free = torch.zeros(num_layers, num_kv_heads, dtype=torch.long, device=device)
        self._heads = torch.arange(num_kv_heads, device=device)
        self._chunk: tuple[int, int] | None = None
        if self.position_mode == "cache":
            if rotary_dim is None or rope_theta is None:
                raise ConfigError(f"{self.name} with cache positions needs the model's "
                                  "rotary_dim and rope_theta (make_cache passes them)")
            self.rotary_dim = rotary_dim
            self.freqs = rope.inv_freq(rotary_dim, rope_theta, device=device)

    # ----- the rule ----------------------------------------------------------------------
    def _new_scores(self, held: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Scores [Hkv, N] of the keys attention saw, from their held scores [Hkv, N]
        (0 for keys new in this pass) and the probabilities [Hkv, G, T, N]."""
        raise NotImplementedError

    # ----- the interface the model uses ---------------------------------------------------
    def plan_prefill(self, t0: int, T: int) -> Plan:
        if T < 1:
            raise InputError("cannot prefill an empty chunk")
        self._chunk = (t0, T)
        dev = self.pos.device
        return Plan(q_pos=torch.arange(t0, t0 + T, device=dev) + self.position_offset,
                    q_pos_sink=None, mask=None, key_is_sink=None)

    def plan_decode(self, t: torch.Tensor) -> Plan:
        return Plan(q_pos=t + self.position_offset, q_pos_sink=None, mask=None,
                    key_is_sink=None, decode_slot=t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> KV:
        if plan.decode_slot is not None:
            return self._update_decode(layer, k, v, plan.decode_slot)
        t0, T = self._chunk
        return self._update_prefill(layer, k, v, t0, T)

    # ----- decode ------------------------------------------------------------------------
    def _put(self, layer: int, heads: torch.Tensor, slots: torch.Tensor, new: KV) -> None:
        """Store encoded tokens ``new`` (fields [n, ...]) at (layer, heads[i], slots[i])."""
        st = self.storage
        bufs = (st.k, st.v) + ((st.k_scale, st.v_scale) if new.k_scale is not None else ())
        for buf, x in zip(bufs, new[:4]):
            buf[layer, heads, slots] = x

    def _update_decode(self, layer: int, k, v, t: torch.Tensor) -> KV:
        slot = self.free[layer]  # [Hkv]
        new = self.storage.encode(k, v)
        self._put(layer, self._heads, slot, KV(*(x[:, 0] for x in new[:4] if x is not None)))
        pos, newer = self.pos[layer], self.newer[layer]
        if self.position_mode == "cache":
            newer.add_((pos >= 0).long())  # every held token has one more newer than it
            newer.scatter_(1, slot[:, None], 0)
        pos.scatter_(1, slot[:, None], t.expand(self.num_kv_heads, 1))
        self.score[layer].scatter_(1, slot[:, None], 0.0)
        kv = self._read(layer, t - newer - pos)
        return kv._replace(mask=(pos >= 0)[:, None, :],
                           observe=functools.partial(self._observe_decode, layer, t))

    def _observe_decode(self, layer: int, t: torch.Tensor, probs: torch.Tensor) -> None:
        pos, score = self.pos[layer], self.score[layer]
        held = pos >= 0
        score.copy_(torch.where(held, self._new_scores(score, probs), 0.0))
        evictable = held & (pos >= self.sink) & (pos <= t - self.recent)
        s = torch.where(evictable, score, float("inf"))  # the lowest score, then the oldest:
        lowest = evictable & (s == s.amin(1, keepdim=True))
        victim = torch.where(lowest, pos, torch.iinfo(torch.long).max).argmin(1)  # [Hkv]
        over = held.sum(1) > self.budget  # [Hkv]; the same for every head
        victim_pos = pos.gather(1, victim[:, None])
        if self.position_mode == "cache":  # older tokens have one fewer newer than them
            self.newer[layer].sub_((over[:, None] & held & (pos < victim_pos)).long())
        pos.scatter_(1, victim[:, None], torch.where(over[:, None], -1, victim_pos))
        first_empty = (~held).to(torch.int8).argmax(1)
        self.free[layer].copy_(torch.where(over, victim, first_empty))

    def _read(self, layer: int, target_minus_text: torch.Tensor) -> KV:
        """The layer's stored keys and values; in ``cache`` mode every key rotated once
        more, by ``target_minus_text`` [Hkv, N] positions, and dequantized first."""
        kv = self.storage.read(layer)
        if self.position_mode != "cache":
            return kv
        k, v = kv.k, kv.v
        if kv.k_scale is not None:
            dt = self.dtype
            k, v = kv.dequantized()
            k, v = k.to(dt), v.to(dt)
        return KV(self._rotate(k, target_minus_text), v)

    def _rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x [Hkv, N, D] rotated by ``delta`` [Hkv, N] positions (angles and products in
        float64, so keys far into a stream keep their accuracy)."""
        ang = delta.to(torch.float64)[..., None] * self.freqs
        return rope.apply(x.double(), torch.cos(ang), torch.sin(ang)).to(x.dtype)

    # ----- prefill -----------------------------------------------------------------------
    def _update_prefill(self, layer: int, k, v, t0: int, T: int) -> KV:
        st = self.storage
        new = st.encode(k, v)
        pos = self.pos[layer]
        Hkv, N = pos.shape
        held = self._read(layer, t0 - 1 - self.newer[layer] - pos)
        if self.position_mode == "cache":  # _read returned float keys and values
            nk, nv = (new.dequantized() if new.k_scale is not None else (new.k, new.v))
            kv = KV(torch.cat((held.k, nk.to(held.k.dtype)), 1),
                    torch.cat((held.v, nv.to(held.v.dtype)), 1))
        else:
            kv = st.concat(held, new)
        causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
        mask = torch.cat(((pos >= 0)[:, None, :].expand(Hkv, T, N),
                          causal[None].expand(Hkv, T, T)), 2)
        return kv._replace(mask=mask,
                           observe=functools.partial(self._observe_prefill, layer, t0, T, new))

    def _observe_prefill(self, layer: int, t0: int, T: int, new: KV,
                         probs: torch.Tensor) -> None:
        pos, score = self.pos[layer], self.score[layer]
        Hkv, N = pos.shape
        dev = pos.device
        chunk_pos = torch.arange(t0, t0 + T, device=dev)[None].expand(Hkv, T)
        all_pos = torch.cat((pos, chunk_pos), 1)
        held = all_pos >= 0
        old = torch.cat((torch.where(pos >= 0, score, 0.0), score.new_zeros(Hkv, T)), 1)
        all_score = torch.where(held, self._new_scores(old, probs), 0.0)
        excess = min(t0, self.budget) + T - self.budget  # host ints: no sync
        victims = torch.zeros_like(held)
        if excess > 0:
            evictable = held & (all_pos >= self.sink) & (all_pos < t0 + T - self.recent)
            by_pos = torch.argsort(torch.where(held, all_pos, torch.iinfo(torch.long).max),
                                   dim=1, stable=True)
            s = torch.where(evictable, all_score, float("inf")).gather(1, by_pos)
            order = by_pos.gather(1, torch.argsort(s, dim=1, stable=True))
            victims.scatter_(1, order[:, :excess], True)
        pos.masked_fill_(victims[:, :N], -1)
        keep = ~victims[:, N:]  # [Hkv, T]: survivors of the chunk
        free_first = torch.argsort((pos >= 0).to(torch.int8), dim=1, stable=True)
        dst = free_first.gather(1, (keep.long().cumsum(1) - 1).clamp_min(0))
        h_idx, i_idx = torch.nonzero(keep, as_tuple=True)
        d_idx = dst[h_idx, i_idx]
        self._put(layer, h_idx, d_idx, KV(*(x[h_idx, i_idx] for x in new[:4] if x is not None)))
        score.copy_(torch.where(pos >= 0, all_score[:, :N], 0.0))
        score[h_idx, d_idx] = all_score[:, N:][h_idx, i_idx]
        pos[h_idx, d_idx] = t0 + i_idx
        held_now = pos >= 0
        if self.position_mode == "cache":  # newer = held count - 1 - rank by text position
            key = torch.where(held_now, pos, torch.iinfo(torch.long).max)
            rank = torch.argsort(torch.argsort(key, 1), 1)
            n_now = min(t0 + T, self.budget)
            self.newer[layer].copy_(torch.where(held_now, n_now - 1 - rank, 0))
        self.free[layer].copy_((~held_now).to(torch.int8).argmax(1))

    # ----- state -------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos.fill_(-1)
        self.score.zero_()
        self.newer.zero_()
        self.free.zero_()

    def snapshot(self) -> list[torch.Tensor]:
        """The device state a decode step changes, besides the slot it writes (which is
        free again once this is restored): for warm-up steps before a graph capture."""
        return [x.clone() for x in (self.pos, self.score, self.newer, self.free)]

    def restore(self, snap: list[torch.Tensor]) -> None:
        for x, saved in zip((self.pos, self.score, self.newer, self.free), snap):
            x.copy_(saved)

    def held_by_head(self) -> list[list[list[int]]]:
        """Text positions held, ascending, per layer and KV head (host side)."""
        return [[sorted(p for p in row if p >= 0) for row in layer]
                for layer in self.pos.tolist()]

    def held_positions(self, t: int) -> list[int]:
        raise InputError(f"the {self.name} cache holds different tokens per layer and KV "
                         "head; use held_by_head()")

    def max_held(self) -> int:
        return self.budget

    def bytes_per_token_read(self) -> int:
        """KV bytes a decode step reads, plus the positions and scores beside them."""
        return self.storage.nbytes() + sum(t.numel() * t.element_size()
                                           for t in (self.pos, self.score))
