"""Prefill, decode step and generation over a model and its cache; the position lives on
the host and is mirrored into a device scalar, so the step is pure device work on static
buffers that :mod:`fastdecode.compile` can compile and capture as a CUDA graph."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .attention import check_prefill_kernel, flash_prefill_enabled
from .cache import KVCache, PolicyConfig, make_cache
from .errors import ConfigError, InputError, NonFiniteError
from .models.transformer import Transformer

# Default prefill chunks (the cache state is exact whatever the chunk): the flash kernel
# takes the prompt in one pass up to ~1 GB of Pythia-2.8B activations; the reference holds
# float32 [heads, T, Nk] scores, so small chunks.
FLASH_CHUNK = 16384
REFERENCE_CHUNK = 512


class Decoder:
    def __init__(self, model: Transformer, cache: KVCache, chunk_size: int | None = None,
                 prefill_kernel: str = "auto"):
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model, self.cache, self.chunk_size = model, cache, chunk_size
        self.prefill_kernel = check_prefill_kernel(prefill_kernel)  # attention.py
        dev = model.device
        self.t = 0
        self.tok_buf = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_fn = self.eager_step  # replaced by fastdecode.compile for compiled modes
        self.compiled = None  # the CompiledStep behind step_fn (fastdecode.compile)

    @classmethod
    def build(cls, model: Transformer, cache_cfg: PolicyConfig, **kw) -> Decoder:
        return cls(model, make_cache(cache_cfg, model.spec, model.dtype, model.device), **kw)

    def reset(self) -> None:
        self.t = 0
        self.cache.reset()  # a no-op for the stateless ring caches; score caches forget

    def _as_ids(self, tokens) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long).flatten().to(self.model.device)
        if ids.numel() == 0:
            raise InputError("empty prompt: give at least one token")
        self._check_id(int(ids.min()))
        self._check_id(int(ids.max()))
        return ids

    def _check_id(self, tok: int) -> None:  # on CUDA a bad id is a context-killing assert
        vocab = self.model.spec.vocab_size
        if not 0 <= tok < vocab:
            raise InputError(f"token id {tok} is out of range for the model's vocabulary "
                             f"(0..{vocab - 1}); is the tokenizer the model's?")

    def prefill_chunk(self) -> int:
        """Tokens per prefill pass: ``chunk_size``, else the attention path's default."""
        if self.chunk_size is not None:
            return self.chunk_size
        flash = flash_prefill_enabled(self.prefill_kernel, self.model.device)
        return FLASH_CHUNK if flash else REFERENCE_CHUNK

    @torch.no_grad()
    def prefill(self, tokens: Sequence[int] | torch.Tensor, all_logits: bool = False):
        """Feed ``tokens`` in chunks (the cache ends as token-by-token feeding leaves it);
        the last token's logits [V] (the head runs on it alone), or all [T, V]."""
        ids = self._as_ids(tokens)
        n = ids.numel()
        self.cache.check_room(self.t + n)
        size = self.prefill_chunk()
        outs, start = [], 0
        while start < n:
            chunk = ids[start:start + min(size, self.cache.prefill_limit(self.t))]
            plan = self.cache.plan_prefill(self.t, chunk.numel())
            start += chunk.numel()
            rows = None if all_logits else slice(-1, None) if start >= n else slice(0, 0)
            outs.append(self.model(chunk, self.cache, plan, rows, self.prefill_kernel))
            self.t += chunk.numel()
        return torch.cat(outs) if all_logits else outs[-1][0]

    def eager_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step on device buffers (the function compile/graphs wrap)."""
        plan = self.cache.plan_decode(pos)
        return self.model(tok, self.cache, plan)[0]

    @torch.no_grad()
    def step(self, token) -> torch.Tensor:
        """Feed one token (int or device tensor [1]); its logits [V], valid after later steps."""
        self.cache.check_room(self.t + 1)
        if isinstance(token, torch.Tensor):
            self.tok_buf.copy_(token.reshape(1))
        else:
            self._check_id(int(token))
            self.tok_buf.fill_(int(token))
        self.pos_buf.fill_(self.t)
        logits = self.step_fn(self.tok_buf, self.pos_buf)
        self.t += 1
        return logits


def check_sampling(temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> None:
    """Validate sampling settings (cheap: commands call it before loading a model)."""
    if not temperature >= 0:  # also NaN
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (int64 tensor [1], on the logits' device): greedy when temperature == 0."""
    check_sampling(temperature, top_k if temperature else None, top_p if temperature else None)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) > top_p  # keep the first over top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)


def generate(decoder: Decoder, prompt: Sequence[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids (stops after ``eos_token_id``). Non-finite
    logits raise NonFiniteError: the flag comes to the host with the token, so the check
    adds no sync, and a NaN never reaches ``torch.multinomial`` (a CUDA assert there)."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    gen = (torch.Generator(device=decoder.model.device).manual_seed(seed)
           if seed is not None else None)
    logits = decoder.prefill(prompt)
    for i in range(max_new_tokens):
        ok = torch.isfinite(logits).all()
        nxt = sample(torch.where(ok, logits, torch.zeros_like(logits)), temperature, top_k,
                     top_p, gen)
        tok, good = torch.stack((nxt.reshape(()), ok.to(nxt.dtype))).tolist()
        if not good:
            where = "the prompt's last token" if i == 0 else f"generated token {i}"
            raise NonFiniteError(
                f"non-finite logits (NaN/Inf) at generation step {i} (after {where}, position "
                f"{decoder.t - 1}): the model's weights hold NaN/Inf, or "
                f"{str(decoder.model.dtype).removeprefix('torch.')} overflowed (try "
                "--dtype float32)")
        yield tok
        if tok == eos_token_id or i == max_new_tokens - 1:
            return
        logits = decoder.step(nxt)
