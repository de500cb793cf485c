"""The fused step for score-based caches (H2O, TOVA: #20): their buffers as the kernels take
them, the scored combine's and the eviction's launches (docs/eviction.md, the fused step)."""

from __future__ import annotations

import torch
import triton

from . import scored_kernels as kernels
from .options import FusedOptions
from .tune import _launch_opts


class ScoredArgs:
    """A score-based cache's (H2O, TOVA: :mod:`fastdecode.cache.scored`) device buffers and
    rule as the fused kernels take them (docs/eviction.md, the fused step)."""

    def __init__(self, cache, num_heads: int, freqs: torch.Tensor):
        self.pos, self.score, self.newer, self.free = cache.pos, cache.score, cache.newer, \
            cache.free
        self.sink, self.recent = cache.sink, cache.recent
        self.tova = int(cache.rule == "mean")
        self.cache_mode = int(cache.position_mode == "cache")
        self.freqs = cache.freqs if self.cache_mode else freqs  # float64 [rotary_dim / 2]
        self.half = self.freqs.numel()
        dev = cache.pos.device
        self.logit = torch.empty(num_heads, cache.slots, dtype=torch.float32, device=dev)
        self.t: torch.Tensor | None = None  # the step's position buffer (set per call)
        # [heads, slots] tiles of <= 4096 values, <= 256 slots (the interpreter: 4, so the
        # tests' tiny caches span several tiles)
        nh = num_heads if self.tova else num_heads // cache.num_kv_heads  # heads a tile
        self.block_h = 1 << (nh - 1).bit_length()
        self.block_n = max(16, min(256, 4096 // self.block_h)) if dev.type == "cuda" else 4
        self.ntiles = -(-cache.slots // self.block_n)
        lay = cache.free.shape
        self.pkey = torch.empty(*lay, self.ntiles + 1, dtype=torch.int64, device=dev)
        self.pidx = torch.empty(*lay, self.ntiles, 2, dtype=torch.int32, device=dev)

    def flags(self) -> dict:  # the split kernel's
        return dict(SCORED=1, CACHE_MODE=self.cache_mode, HALF=self.half)

    def combine(self, m, l_, acc, out, layer, nsplit, slots, hq, hkv, common: dict,
                launch: dict, cuda: bool) -> None:
        """The scored combine after ``tune.attention``'s split launch (``common``, ``launch``:
        its meta-parameters and launch options)."""
        # (KV heads, slot tiles + the group's output heads): ScoredArgs sizes the tiles
        kernels.attn_combine_scored_kernel[(hkv, self.ntiles + hq // hkv)](
            m, l_, acc, out, self.logit, self.t, self.pos, self.score, self.free, self.pkey,
            self.pidx, layer, nsplit, slots, self.sink, self.recent, self.ntiles, HQ=hq,
            HKV=hkv, TOVA=self.tova,
            BLOCK_H=self.block_h, BLOCK_N=self.block_n, num_warps=4 if cuda else 1,
            **common, **launch)

    def evict(self, opts: FusedOptions) -> None:
        """Every layer's eviction from the scored combine's tiles (scored_evict_kernel)."""
        rows, slots = self.free.numel(), self.pos.shape[-1]
        bn = 1024 if self.pos.is_cuda else 4
        kernels.scored_evict_kernel[(rows, triton.cdiv(slots, bn) if self.cache_mode else 1)](
            self.pkey, self.pidx, self.pos, self.newer, self.free, slots, self.ntiles,
            CACHE_MODE=self.cache_mode, BLOCK_T=triton.next_power_of_2(self.ntiles),
            BLOCK_N=bn,
            num_warps=4 if self.pos.is_cuda and self.cache_mode else 1,
            **_launch_opts(self.pos, opts))
