"""Attention of new queries over what a cache returns, with sink keys scored separately.

Prefill (T > 1 queries on a prefill plan) takes the flash kernel
(:mod:`fastdecode.kernels.flash_prefill`) when the caller asks for it, else the reference
below, which builds the float32 [heads, T, Nk] scores. The choice is an argument
(``prefill_kernel``: auto | flash | reference), never the interpreter flag alone: pytest sets
that process-wide, and every CPU prefill would then crawl through the interpreter.
"""

from __future__ import annotations

import math
import os

import torch

from . import rope
from .cache.base import Plan
from .cache.storage import KV
from .errors import ConfigError, DeviceError

PREFILL_KERNELS = ("auto", "flash", "flash-q-rope", "reference")


def check_prefill_kernel(kernel: str) -> str:
    if kernel not in PREFILL_KERNELS:
        raise ConfigError(f"prefill kernel {kernel!r} is not one of {PREFILL_KERNELS}")
    return kernel


def flash_prefill_enabled(kernel: str, device) -> bool:
    """Whether ``kernel`` means the flash kernel on ``device`` (auto: on CUDA only)."""
    if check_prefill_kernel(kernel) == "reference":
        return False
    if torch.device(device).type == "cuda":
        return True
    if kernel != "auto" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError("the flash prefill kernel runs on CUDA (on the CPU only under "
                          "TRITON_INTERPRET=1, for tests)")
    return kernel != "auto"


def attend(q: torch.Tensor, q_sink: torch.Tensor | None, kv: KV, plan: Plan,
           num_sink: int, flash: bool = False, rot=None, rot_sink=None) -> torch.Tensor:
    """Softmax attention [Hq, T, D] of q (and q_sink, rotated at the sink position) over
    kv [Hkv, Nk, D], GQA when Hq > Hkv; int8 scales apply to scores and probabilities. In
    decode (``plan.key_is_sink`` None) the sinks are the first ``num_sink`` keys.
    ``kv.mask`` (score-based caches) replaces ``plan.mask`` per KV head, ``kv.observe`` sees
    the probabilities. ``flash``: a prefill on an unscored cache takes the flash kernel.
    ``rot`` (cos, sin): q is not rotated yet (``q_sink`` None): it is rotated here at the
    text positions and, with ``rot_sink``, at the sink positions (the kernel: in registers)."""
    keys, values = kv.k, kv.v
    if flash and plan.key_pos is not None and q.shape[1] > 1 and kv.mask is None \
            and kv.observe is None:
        from .kernels.flash_prefill import flash_prefill

        return flash_prefill(q, q_sink, kv.k, kv.v, kv.k_scale, kv.v_scale, plan.key_pos,
                             plan.q_lo, plan.q_ti, num_sink, memo=plan.memo, rot=rot,
                             rot_sink=rot_sink)
    if rot is not None:
        q_sink = rope.apply(q, *rot_sink) if rot_sink is not None else None
        q = rope.apply(q, *rot)
    if kv.k_scale is not None:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    Hq, T, D = q.shape
    Hkv, Nk, _ = keys.shape
    G = Hq // Hkv
    qg = q.reshape(Hkv, G * T, D)
    if q_sink is None:
        scores = qg @ keys.transpose(1, 2)
    elif plan.key_is_sink is None:
        sg = q_sink.reshape(Hkv, G * T, D)
        scores = torch.cat((sg @ keys[:, :num_sink].transpose(1, 2),
                            qg @ keys[:, num_sink:].transpose(1, 2)), dim=-1)
    else:
        sg = q_sink.reshape(Hkv, G * T, D)
        scores = torch.where(plan.key_is_sink, sg @ keys.transpose(1, 2),
                             qg @ keys.transpose(1, 2))
    scores = scores.float().view(Hkv, G, T, Nk) * (1.0 / math.sqrt(D))
    if kv.k_scale is not None:
        scores = scores * kv.k_scale[:, None, None, :]
    mask = plan.mask if kv.mask is None else kv.mask[:, None]  # per-KV-head mask
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if kv.observe is not None:  # score-based eviction: what each key received
        kv.observe(probs)
    if kv.v_scale is not None:
        probs = probs * kv.v_scale[:, None, None, :]
    probs = probs.to(values.dtype).view(Hkv, G * T, Nk)
    return (probs @ values).view(Hq, T, D)
