"""Attention of new queries over what a cache returns, with sink keys scored separately.

Prefill (T > 1 queries on a prefill plan) takes the flash kernel
(:mod:`fastdecode.kernels.flash_prefill`) where it runs, else the reference below, which
builds the float32 [heads, T, Nk] scores. ``prefill_kernel`` says which: ``auto`` (flash on
CUDA, the reference on the CPU), ``flash`` (on the CPU only under ``TRITON_INTERPRET=1``,
for tests), ``reference``; tests and measurement scripts scope a choice with :func:`prefill_kernel`.
Not the interpreter flag alone: pytest sets it process-wide as soon as one test
module needs it, and every CPU prefill would then crawl through the interpreter.
``PREFILL_PATHS`` counts the prefill calls each path served (tests read it).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter

import torch

from .cache.base import Plan
from .cache.storage import KV
from .errors import ConfigError, DeviceError

PREFILL_KERNELS = ("auto", "flash", "reference")
_prefill = {"kernel": "auto"}
PREFILL_PATHS: Counter = Counter()


def _check_kernel(kernel: str) -> str:
    if kernel not in PREFILL_KERNELS:
        raise ConfigError(f"prefill kernel {kernel!r} is not one of {PREFILL_KERNELS}")
    return kernel


@contextlib.contextmanager
def prefill_kernel(kernel: str):
    """Within the block, prefill attention uses ``kernel`` (auto | flash | reference)."""
    saved = _prefill["kernel"]
    _prefill["kernel"] = _check_kernel(kernel)
    try:
        yield
    finally:
        _prefill["kernel"] = saved


def flash_prefill_enabled(device) -> bool:
    """Whether prefill attention on ``device`` takes the flash kernel."""
    kernel = _check_kernel(_prefill["kernel"])
    if kernel == "reference":
        return False
    if torch.device(device).type == "cuda":
        return True
    if kernel == "flash":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise DeviceError("the flash prefill kernel runs on CUDA (on the CPU only under "
                              "TRITON_INTERPRET=1, for tests)")
        return True
    return False


def attend(q: torch.Tensor, q_sink: torch.Tensor | None, kv: KV, plan: Plan,
           num_sink: int) -> torch.Tensor:
    """Softmax attention for T queries.

    q, q_sink: [Hq, T, D] (q_sink: the same queries rotated at the sink position);
    kv: keys, values [Hkv, Nk, D] (int8 storage: codes plus per-key scales, applied to the
    scores and the probabilities rather than to the keys/values); returns [Hq, T, D].
    Grouped-query attention when Hq > Hkv. In decode (``plan.key_is_sink is None``) the
    sinks are the first ``num_sink`` keys. ``kv.mask`` (score-based caches) replaces
    ``plan.mask`` by one mask per KV head, and ``kv.observe`` is handed the probabilities.
    """
    keys, values = kv.k, kv.v
    key_pos = getattr(plan, "key_pos", None)  # prefill plans carry it (duck-typed plans not)
    if key_pos is not None and q.shape[1] > 1 and kv.mask is None and kv.observe is None:
        if flash_prefill_enabled(q.device):
            from .kernels.flash_prefill import flash_prefill

            PREFILL_PATHS["flash"] += 1
            return flash_prefill(q, q_sink, kv.k, kv.v, kv.k_scale, kv.v_scale, key_pos,
                                 plan.q_lo, plan.q_ti, num_sink, memo=plan.memo)
        PREFILL_PATHS["reference"] += 1
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
