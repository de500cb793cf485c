"""Score-based eviction (H2O, TOVA) the slow, obvious way: the oracle for cache/h2o.py and
cache/tova.py.

Each layer keeps, per KV head, its held tokens as growing tensors: keys *before* RoPE,
values, text positions (ascending) and scores. A chunk of T >= 1 new tokens (T = 1 is a
decode step) is concatenated to what is held, attends causally over held + chunk with every
key rotated afresh (``absolute``: at its text position; ``cache``: at its rank among the
keys, the query at its own rank, the authors' "position rolling"), the probabilities update
the scores (:data:`RULES`), and then tokens are evicted one at a time, the lowest
(score, text position) among the evictable first, until at most ``budget`` are held.
Evictable: not one of the ``sink`` first tokens of the text, not one of the ``recent`` most
recent. Since the scores do not change while evicting, this equals keeping the best ones.

Chunked prefill is this same rule with T > 1: the scores of a chunk are the column sums of
its causal attention, and the cache is cut back to the budget once, after the chunk. For a
prompt fed as one chunk into an empty cache that is exactly the authors' prefill (column
sums of the causal prompt attention, then keep the top scores outside the recent window;
their ``torch.topk`` breaks ties arbitrarily, this breaks them towards evicting the oldest).
It is *not* the same as feeding the prompt token by token (which evicts as it goes); the
fast caches follow whichever schedule they are fed, chunk for chunk.

O(held^2) Python per eviction and a full re-rotation per step: only for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..cache.storage import quantize_int8
from ..models.transformer import Transformer
from .streaming import _rotate


def h2o_rule(held_scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """H2O: every key's score grows by the probability it receives from every query of the
    chunk, summed over the query heads of its KV head (GQA). ``held_scores`` [Hkv, n]
    float32, ``probs`` [Hkv, G, T, n + T]: the new scores [Hkv, n + T]."""
    Hkv, _, T, _ = probs.shape
    old = torch.cat((held_scores, held_scores.new_zeros(Hkv, T)), 1)
    return old + probs.sum((1, 2))


def tova_rule(held_scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """TOVA: the last query's probability averaged over all the layer's query heads, the
    same for every KV head (so every head evicts the same token)."""
    Hkv, G, _, N = probs.shape
    last = probs[:, :, -1].reshape(Hkv * G, N).mean(0)
    return last[None].expand(Hkv, N).clone()


RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "h2o": h2o_rule, "tova": tova_rule}


def identity_rotation(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class ScoredLayer:
    """One attention layer's held tokens and the eviction rule.

    ``rotate(x [.., N, D], positions [.., N])``: RoPE at integer positions (float64)."""

    num_kv_heads: int
    rule: str
    budget: int
    sink: int = 0
    recent: int = 0
    position_mode: str = "absolute"
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = identity_rotation
    position_offset: int = 0
    k: torch.Tensor | None = None  # [Hkv, n, D], before RoPE
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # int64 [Hkv, n], ascending per head
    score: torch.Tensor | None = None  # float32 [Hkv, n]
    probs: torch.Tensor | None = None  # the last chunk's probabilities [Hkv, G, T, N]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t0: int) -> torch.Tensor:
        """Queries q [Hq, T, D], new keys (before RoPE) and values [Hkv, T, D] of the text
        positions t0..t0+T-1: returns the attention output [Hq, T, D] and updates the
        held tokens."""
        Hkv, T, D = k.shape
        Hq = q.shape[0]
        G = Hq // Hkv
        new_pos = torch.arange(t0, t0 + T)[None].expand(Hkv, T)
        if self.k is None:
            self.k, self.v = k[:, :0], v[:, :0]
            self.pos = new_pos[:, :0]
            self.score = torch.zeros(Hkv, 0)
        n = self.k.shape[1]
        keys, values = torch.cat((self.k, k), 1), torch.cat((self.v, v), 1)
        pos = torch.cat((self.pos, new_pos), 1)
        if self.position_mode == "absolute":
            kpos, qpos = pos + self.position_offset, new_pos[0] + self.position_offset
        else:  # rank among the held keys; the query sits at its own rank
            kpos = torch.arange(n + T)[None].expand(Hkv, n + T)
            qpos = n + torch.arange(T)
        kr = self.rotate(keys, kpos)
        qr = self.rotate(q, qpos[None].expand(Hq, T))
        visible = torch.ones(T, n + T, dtype=torch.bool)
        visible[:, n:] = torch.ones(T, T, dtype=torch.bool).tril()
        kr, vr = kr.repeat_interleave(G, 0), values.repeat_interleave(G, 0)  # query head h
        s = (qr @ kr.transpose(1, 2)).float() / math.sqrt(D)  # reads KV head h // G
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        out = p.to(vr.dtype) @ vr
        self.probs = probs = p.view(Hkv, G, T, n + T)
        score = RULES[self.rule](self.score, probs)
        keep = [self._survivors(pos[h].tolist(), score[h].tolist(), t0 + T)
                for h in range(Hkv)]
        idx = torch.tensor(keep, dtype=torch.long).reshape(Hkv, -1)
        pick = lambda x: x.gather(1, idx if x.dim() == 2 else  # noqa: E731
                                  idx[..., None].expand(-1, -1, x.shape[-1]))
        self.k, self.v, self.pos, self.score = (pick(keys), pick(values), pick(pos),
                                                pick(score))
        return out

    def _survivors(self, pos: list[int], score: list[float], t_end: int) -> list[int]:
        """Indices kept after evicting, one at a time, the lowest (score, position) among
        the evictable tokens while more than ``budget`` are held."""
        alive = list(range(len(pos)))
        while len(alive) > self.budget:
            evictable = [i for i in alive
                         if pos[i] >= self.sink and pos[i] < t_end - self.recent]
            victim = min(evictable, key=lambda i: (score[i], pos[i]))
            alive.remove(victim)
        return alive


@dataclass
class ScoredRun:
    """The oracle's logits [N, V], its layers' final state, and after every chunk a copy of
    every layer's (positions [Hkv, n], scores [Hkv, n])."""

    logits: torch.Tensor
    layers: list[ScoredLayer]
    states: list[list[tuple[torch.Tensor, torch.Tensor]]]


def _fake_int8(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_int8(x)
    return (q.float() * s[..., None]).to(x.dtype)


@torch.no_grad()
def scored_logits(model: Transformer, tokens, *, rule: str, budget: int, sink: int = 0,
                  recent: int = 0, position_mode: str = "absolute", position_offset: int = 0,
                  chunks: Sequence[int] | None = None, kv_int8: bool = False) -> ScoredRun:
    """Run ``tokens`` through ``model`` with score-based eviction, chunk by chunk
    (``chunks``: chunk sizes summing to len(tokens); None: one token at a time).

    ``kv_int8``: keys (rotated at their text position, as the fast caches store them) and
    values go through int8 quantization first, so the oracle holds what int8 storage
    holds; keys are kept before RoPE by rotating the dequantized key back (float64)."""
    spec = model.spec
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    N = tokens.numel()
    chunks = [1] * N if chunks is None else list(chunks)
    if sum(chunks) != N or min(chunks, default=1) < 1:
        raise ValueError(f"chunks {chunks} do not split {N} tokens")

    def rotate(x, positions):
        return _rotate(x, positions, spec.rotary_dim, spec.rope_theta)

    layers = [ScoredLayer(Hkv, rule, budget, sink, recent, position_mode, rotate,
                          position_offset) for _ in model.layers]
    out, states, t0 = [], [], 0
    for T in chunks:
        x = model.embed(tokens[t0:t0 + T].to(model.device))
        for block, ref in zip(model.layers, layers):
            h = block.norm1(x)
            qkv = block.attn.qkv(h).view(T, H + 2 * Hkv, D).transpose(0, 1)
            q, k, v = qkv[:H], qkv[H:H + Hkv], qkv[H + Hkv:]
            if kv_int8:
                p = (torch.arange(t0, t0 + T) + position_offset)[None].expand(Hkv, T)
                k = rotate(_fake_int8(rotate(k, p)), -p)
                v = _fake_int8(v)
            a = ref.attend(q, k, v, t0)
            a = block.attn.out(a.transpose(0, 1).reshape(T, H * D))
            if block.parallel:
                x = x + a + block.mlp(block.norm2(x))
            else:
                x = x + a
                x = x + block.mlp(block.norm2(x))
        out.append(model.lm_head(model.norm(x)))
        states.append([(ref.pos.clone(), ref.score.clone()) for ref in layers])
        t0 += T
    return ScoredRun(torch.cat(out), layers, states)

