"""The sinks + ring storage behind the dense, window and streaming policies, and the
interface every policy implements (plan, update): keys rotated once, at their text position
(docs/design.md#the-position-trick, #adding-a-cache-policy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from .policy import PolicyConfig
from .storage import KV, STORAGES


@dataclass
class Plan:
    """Everything one forward pass needs to know about positions and visibility."""

    q_pos: torch.Tensor  # int64 [T]: text positions of the new tokens (queries and new keys)
    q_pos_sink: torch.Tensor | None  # int64 [T]: where queries score sink keys; None if S=0
    mask: torch.Tensor | None  # bool [T, Nk]: key visible to query (prefill: see mask_fn)
    key_is_sink: torch.Tensor | None  # bool [Nk] (prefill); None in decode (first S columns)
    write_src: torch.Tensor | None = None  # prefill: which new tokens are stored...
    write_dst: torch.Tensor | None = None  # ...and in which slots
    decode_slot: torch.Tensor | None = None  # decode: the slot of the new token, int64 [1]
    # Prefill, for the flash kernel (the mask's inputs, so it need not read [T, Nk]):
    key_pos: torch.Tensor | None = None  # int64 [Nk]: text position of each key, -1 empty
    q_lo: torch.Tensor | None = None  # int64 [T]: lowest visible window position
    q_ti: torch.Tensor | None = None  # int64 [T]: the queries' text positions (no offset)
    memo: dict | None = None  # per-plan scratch shared by the layers (kernel block tables)
    # Prefill: builds ``mask`` on first read, so the flash path (which reads key_pos, q_lo
    # and q_ti only) never materialises the [T, Nk] mask.
    mask_fn: Callable[[], torch.Tensor] | None = None


def _get_mask(plan: Plan) -> torch.Tensor:
    if plan._mask is None and plan.mask_fn is not None:
        plan._mask = plan.mask_fn()
    return plan._mask


def _set_mask(plan: Plan, mask: torch.Tensor | None) -> None:
    plan._mask = mask


# ``mask`` stays an ordinary field for the constructor and dataclasses.replace; reads go
# through mask_fn when it was not given.
Plan.mask = property(_get_mask, _set_mask)


class KVCache:
    """Sinks + ring storage for all layers. Subclasses only set S, W, R and the mode."""

    def __init__(self, cfg: PolicyConfig, *, sink: int, window: int, compress_every: int,
                 num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu", position_offset: int = 0,
                 ring: int | None = None, tail: int = 0):
        self.cfg = cfg
        # Added to every rotary position: a stream whose first token sits at this absolute
        # position (tests use ~10^7 to check that angles lose no accuracy).
        self.position_offset = position_offset
        self.sink, self.window, self.compress_every = sink, window, compress_every
        self.position_mode = cfg.position_mode
        # ``ring``/``tail``: a larger ring and slots after it (the refresh policy's)
        self.ring = window + compress_every if ring is None else ring
        self.slots = self.sink + self.ring + tail
        shape = (num_layers, num_kv_heads, self.slots, head_dim)
        self.storage = STORAGES[cfg.kv_dtype](shape, dtype, device)
        self._sink_ar = torch.arange(self.sink, device=device)
        self._ring_ar = torch.arange(self.ring, device=device)

    def window_held(self, m):
        """Window tokens held after ``m`` non-sink tokens were added (ints or tensors)."""
        W, R = self.window, self.compress_every
        if isinstance(m, torch.Tensor):
            return torch.where(m <= W, m, W + torch.remainder(m - W, R))
        return m if m <= W else W + (m - W) % R

    def _query_bounds(self, ti: torch.Tensor):
        """(lowest visible window position, sink-scoring position) of queries at ``ti``."""
        held_before = self.window_held((ti - self.sink).clamp_min(0))
        lo = ti - held_before
        if self.position_mode == "cache":
            pos_sink = torch.clamp(ti, max=self.sink) + held_before
        else:
            pos_sink = ti
        return lo, pos_sink + self.position_offset

    def _slot_tokens(self, t_last: torch.Tensor | int) -> torch.Tensor:
        """Text position held by every slot once tokens ``0..t_last`` are written; -1 if empty."""
        S, C = self.sink, self.ring
        sink_j = torch.where(self._sink_ar <= t_last, self._sink_ar, -1)
        j = t_last - torch.remainder(t_last - S - self._ring_ar, C)
        ring_j = torch.where(j >= S, j, -1)
        return torch.cat((sink_j, ring_j))

    def _mask(self, keys_j: torch.Tensor, ti: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        kj = keys_j[None, :]
        visible_window = (kj >= self.sink) & (kj >= lo[:, None])
        return (kj >= 0) & (kj <= ti[:, None]) & ((kj < self.sink) | visible_window)

    def slot_of(self, t):
        S = self.sink
        if isinstance(t, torch.Tensor):
            return torch.where(t < S, t, S + torch.remainder(t - S, self.ring))
        return t if t < S else S + (t - S) % self.ring

    def check_room(self, t_end: int) -> None:
        """Raise if feeding tokens up to position ``t_end`` (exclusive) cannot be held."""

    def prefill_limit(self, t0: int) -> int:
        """The most tokens one prefill chunk starting at ``t0`` may hold (refresh's cut)."""
        return 1 << 62

    def plan_prefill(self, t0: int, T: int) -> Plan:
        """Plan for feeding tokens ``t0 .. t0+T-1`` after ``t0`` tokens are in the cache."""
        if T < 1:
            raise InputError("cannot prefill an empty chunk")
        self.check_room(t0 + T)
        dev = self._sink_ar.device
        ti = torch.arange(t0, t0 + T, device=dev)
        lo, pos_sink = self._query_bounds(ti)
        keys_j = torch.cat((self._slot_tokens(t0 - 1), ti))
        # Store the chunk's sinks, and of its window tokens only the last `ring` (older
        # ones would be overwritten in the same scatter).
        keep = (ti < self.sink) | (ti >= t0 + T - self.ring)
        src = torch.nonzero(keep).flatten()
        return Plan(
            q_pos=ti + self.position_offset,
            q_pos_sink=pos_sink if self.sink else None,
            mask=None,
            key_is_sink=(keys_j >= 0) & (keys_j < self.sink) if self.sink else None,
            write_src=src,
            write_dst=self.slot_of(ti[src]),
            key_pos=keys_j, q_lo=lo, q_ti=ti, memo={},
            mask_fn=lambda: self._mask(keys_j, ti, lo),
        )

    def plan_decode(self, t: torch.Tensor) -> Plan:
        """Plan for one token at position ``t`` (int64 [1]): no host sync, CUDA-graph safe."""
        lo, pos_sink = self._query_bounds(t)
        return Plan(
            q_pos=t + self.position_offset,
            q_pos_sink=pos_sink if self.sink else None,
            mask=self._mask(self._slot_tokens(t[0]), t, lo),
            key_is_sink=None,
            decode_slot=self.slot_of(t),
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> KV:
        """Store new keys/values ``[Hkv, T, D]`` and return what to attend over, the new
        tokens exactly as stored (int8: quantized)."""
        st = self.storage
        if plan.decode_slot is not None:
            st.write(layer, plan.decode_slot, k, v)
            return st.read(layer)
        new = st.encode(k, v)
        kv = st.concat(st.read(layer), new)
        st.write_encoded(layer, plan.write_dst, new, plan.write_src)
        return kv

    @property
    def k(self) -> torch.Tensor:
        """The stored keys [L, Hkv, slots, D] (int8 codes for int8 storage)."""
        return self.storage.k

    @property
    def v(self) -> torch.Tensor:
        return self.storage.v

    def reset(self) -> None:
        """Forget everything (the buffers are reused; stale slots are never visible)."""

    def held_positions(self, t: int) -> list[int]:
        """Text positions held, in cache order, after ``t`` tokens have been fed."""
        if t <= 0:
            return []
        sinks = list(range(min(t, self.sink)))
        held = self.window_held(max(t - self.sink, 0))
        return sinks + list(range(t - held, t))

    def max_held(self) -> int:
        """Most tokens ever held between steps."""
        return self.cfg.max_held

    @property
    def name(self) -> str:
        """The policy's registry name."""
        return self.cfg.policy

    def bytes_per_token_read(self) -> int:
        """KV bytes a decode step reads (every slot of every layer, scales included)."""
        return self.storage.nbytes()
