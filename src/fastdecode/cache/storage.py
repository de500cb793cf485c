"""How a cache stores keys and values (every policy's ``kv_dtype`` option): in the model
dtype, or int8 with per-head, per-token scales."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class KV(NamedTuple):
    """What attention reads: keys/values [Hkv, N, D] (int8: and scales [Hkv, N]); score-based
    caches add a per-head ``mask`` [Hkv, T, N] and an ``observe(probs)`` callback."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    observe: Callable[[torch.Tensor], None] | None = None

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is None:
            return self.k, self.v
        return (self.k.float() * self.k_scale[..., None], self.v.float() * self.v_scale[..., None])


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes, float32 scale [...]): symmetric, one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-8) / 127.0
    return torch.round(xf / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


class DenseStorage:
    """Keys and values in the model dtype; ``buffers`` are what a layer's KV is read from."""

    def __init__(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layer_idx = torch.arange(shape[0], device=device)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v

    def _put(self, buf: torch.Tensor, layer: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        """``buf[layer][:, slots] = x`` as one index_put_ on the whole buffer: torch.compile
        cannot re-inplace a write through the view ``buf[layer]`` and would copy the cache."""
        buf[self._layer_idx[layer:layer + 1], :, slots] = x.transpose(0, 1)

    def encode(self, k, v) -> KV:
        return KV(k, v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.write_encoded(layer, slots, self.encode(k, v), None)

    def write_encoded(self, layer, slots, new: KV, src: torch.Tensor | None) -> None:
        """Store ``new`` (its tokens ``src``, all if None) in ``slots``."""
        for buf, x in zip(self.buffers, new):
            self._put(buf, layer, slots, x if src is None else x.index_select(1, src))

    def read(self, layer: int) -> KV:
        return KV(*(b[layer] for b in self.buffers))

    def concat(self, a: KV, b: KV) -> KV:
        return KV(*(torch.cat((x, y), 1) for x, y in zip(a[:len(self.buffers)], b)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)


class Int8Storage(DenseStorage):
    """int8 codes plus a float32 scale per (layer, head, slot): half the bytes of bf16."""

    def __init__(self, shape, dtype, device):
        super().__init__(shape, torch.int8, device)
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v, self.k_scale, self.v_scale

    def encode(self, k, v) -> KV:
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        return KV(kq, vq, ks, vs)


STORAGES = {"auto": DenseStorage, "int8": Int8Storage}
