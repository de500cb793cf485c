"""The refresh policy the slow, obvious way: the oracle for :mod:`fastdecode.cache.refresh`.

One token at a time. Per layer: the sinks (the first ``sink`` tokens), the window (the last
``window`` non-sink tokens), the pool (tokens evicted from the window since the last
refresh, with the attention each received while held) and, per KV head, the refreshed
tokens. At the start of step ``t``, when ``t - sink - window`` is a positive multiple of
``every``, each head's refreshed tokens are replaced by ``refresh`` of the pool (``uniform``:
pool indices ``(2i+1) * every // (2 * refresh)``; ``score``: the highest accumulated
attention, ties to the older) and the pool is emptied. Keys are kept *before* RoPE and the
whole held set is re-rotated every step, StreamingLLM's way: ``cache`` mode at each key's
rank among the held tokens in text order (sinks, refreshed, window), the query at its own;
``absolute`` at text positions. O(held) Python per step: only for tests.
"""

from __future__ import annotations

import math

import torch

from ..models.transformer import Transformer
from .scored import _fake_int8
from .streaming import _rotate


@torch.no_grad()
def refresh_logits(model: Transformer, tokens, *, sink: int, window: int, refresh: int,
                   every: int, select: str = "uniform", position_mode: str = "cache",
                   position_offset: int = 0, kv_int8: bool = False):
    """Logits [N, V] of ``tokens`` fed one at a time, and per step the held text positions
    per layer and KV head (``held[t][layer][head]``, ascending, after step t).

    ``kv_int8``: keys (rotated where the fast cache stores them: at the text position, and
    in ``cache`` mode a refreshed key at its rank ``sink + i``) and values pass through int8
    quantization, so the oracle holds what int8 storage holds."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    G = H // Hkv
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()

    def rot(x, positions):  # x [Hkv, n, D] at positions [Hkv, n] (or broadcastable ints)
        p = torch.as_tensor(positions, dtype=torch.long).expand(x.shape[:-1])
        return _rotate(x, p, spec.rotary_dim, spec.rope_theta)

    layers = [dict(sink=sink, kv={}, window=[], pool=[], score={}, rk={},
                   refreshed=[[] for _ in range(Hkv)]) for _ in model.layers]
    out, held_log = [], []
    for t, tok in enumerate(tokens.tolist()):
        m = t - sink - window
        x = model.embed(torch.tensor([tok], device=model.device))
        for block, L in zip(model.layers, layers):
            if m > 0 and m % every == 0:
                _refill(L, refresh, every, select, sink + position_offset,
                        kv_int8 and position_mode == "cache", rot)
            h = block.norm1(x)
            qkv = block.attn.qkv(h).view(1, H + 2 * Hkv, D).transpose(0, 1)
            q, k, v = qkv[:H], qkv[H:H + Hkv], qkv[H + Hkv:]
            if kv_int8:
                p = t + position_offset
                k, v = rot(_fake_int8(rot(k, p)), -p), _fake_int8(v)
            L["kv"][t] = (k[:, 0], v[:, 0])
            if t >= sink:
                L["window"].append(t)
                L["score"][t] = torch.zeros(Hkv)
            outs = []
            for hd in range(Hkv):
                held = [j for j in range(min(t + 1, sink))] + L["refreshed"][hd] + L["window"]
                keys = torch.stack([L["rk"][hd, j] if (hd, j) in L["rk"] else L["kv"][j][0][hd]
                                    for j in held])
                vals = torch.stack([L["kv"][j][1][hd] for j in held])
                n = len(held)
                if position_mode == "cache":
                    kr = rot(keys[None], torch.arange(n)[None])[0]
                    qr = rot(q[hd * G:(hd + 1) * G], n - 1)
                else:
                    pos = torch.tensor(held) + position_offset
                    kr = rot(keys[None], pos[None])[0]
                    qr = rot(q[hd * G:(hd + 1) * G], t + position_offset)
                s = (qr[:, 0].double() @ kr.double().T).float() / math.sqrt(D)  # [G, n]
                p = torch.softmax(s, -1)
                outs.append(p.to(vals.dtype) @ vals)  # [G, D]
                got = p.sum(0)
                for i, j in enumerate(held):
                    if j in L["score"]:
                        L["score"][j][hd] += got[i]
            a = torch.cat(outs)[None].reshape(1, H * D)  # heads in order
            a = block.attn.out(a)
            if block.parallel:
                x = x + a + block.mlp(block.norm2(x))
            else:
                x = x + a
                x = x + block.mlp(block.norm2(x))
            if len(L["window"]) > window:
                L["pool"].append(L["window"].pop(0))
        out.append(model.lm_head(model.norm(x))[0])
        held_log.append([[list(range(min(t + 1, sink))) + L["refreshed"][hd] + L["window"]
                          for hd in range(Hkv)] for L in layers])
    return torch.stack(out), held_log


def _refill(L: dict, refresh: int, every: int, select: str, rank0: int, requantize: bool,
            rot) -> None:
    """Replace every head's refreshed tokens by ``refresh`` of the pool; empty the pool.
    ``requantize``: int8 keys in cache mode, stored re-quantized at rotation ``rank0 + i``."""
    pool = L["pool"]
    assert len(pool) == every, (len(pool), every)
    L["rk"] = {}
    for hd in range(len(L["refreshed"])):
        if select == "uniform":
            idx = [(2 * i + 1) * every // (2 * refresh) for i in range(refresh)]
        else:
            idx = sorted(range(len(pool)), key=lambda i: (-float(L["score"][pool[i]][hd]), i))
            idx = sorted(idx[:refresh])
        L["refreshed"][hd] = [pool[i] for i in idx]
        for i, j in enumerate(L["refreshed"][hd] if requantize else ()):
            k = L["kv"][j][0][hd][None, None]
            L["rk"][hd, j] = rot(_fake_int8(rot(k, rank0 + i)), -(rank0 + i))[0, 0]
    keep = set(range(L["sink"])) | set(L["window"]) | {j for r in L["refreshed"] for j in r}
    for j in [j for j in L["kv"] if j not in keep]:
        del L["kv"][j]
    for j in [j for j in L["score"] if j not in L["window"]]:
        del L["score"][j]
    L["pool"] = []
