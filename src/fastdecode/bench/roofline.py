"""The bandwidth floor of a decode step: bytes it must read, the copy bandwidth measured in
the same run, and the share of that floor a measured TPOT reaches (the efficiency the
perf budgets hold on any GPU class; perf/budgets.toml, docs/gpu.md)."""

from __future__ import annotations

import statistics

import torch


def bytes_per_token(model, cache) -> dict:
    """Bytes one decode step must read: every weight once in its stored format (int8/int4
    codes with their scales and zeros, biases, norms), the embedding table only for its one
    row unless it is also the output head, plus every KV slot of every layer, K and V, in
    the storage dtype with its scales (``cache.bytes_per_token_read()``)."""
    seen, weights = set(), 0
    embed, head = model.embed.weight, model.lm_head.weight
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t is model.freqs:  # rotary frequencies: not read per step
            continue
        seen.add(id(t))
        if t is embed and embed is not head:
            weights += embed.shape[1] * embed.element_size()
            continue
        weights += t.numel() * t.element_size()
    kv = cache.bytes_per_token_read()
    return {"weights": weights, "kv": kv, "total": weights + kv}


def device_bandwidth(device, nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Copy bandwidth (bytes read + written per second, device to device; the H200 gives
    4,246 GB/s) and read bandwidth (a sum over the same buffer) in GB/s: medians over
    ``reps`` CUDA-event-timed runs. On the CPU: not measured (None)."""
    if torch.device(device).type != "cuda":
        return {"copy_gbps": None, "read_gbps": None}
    src = torch.randn(nbytes // 2, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    acc = torch.empty((), device=device, dtype=torch.float32)

    def med(fn) -> float:
        for _ in range(3):
            fn()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * reps)]
        for i in range(reps):
            ev[2 * i].record()
            fn()
            ev[2 * i + 1].record()
        ev[-1].synchronize()
        return statistics.median(ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(reps))

    copy_ms = med(lambda: dst.copy_(src))
    read_ms = med(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=acc))
    return {"copy_gbps": 2 * nbytes / copy_ms / 1e6, "read_gbps": nbytes / read_ms / 1e6,
            "copy_ms": copy_ms, "read_ms": read_ms, "buffer_bytes": nbytes}


def floor_ms(nbytes: float, copy_gbps: float) -> float:
    """The time reading ``nbytes`` takes at the copy bandwidth (read + written bytes per
    second, so a copy's rate, not a pure read's), in milliseconds."""
    return nbytes / copy_gbps / 1e6


def efficiency(nbytes: float, tpot_ms: float, copy_gbps: float) -> float:
    """Share of the floor reached: floor / TPOT (1.0 = at the copy bandwidth)."""
    return floor_ms(nbytes, copy_gbps) / tpot_ms
