"""Perplexity on long text through a KV-cache policy: token by token, and exact in parallel.

As the paper's ``eval_long_ppl``: after feeding token ``t`` the model is scored on token
``t + 1`` (``N + 1`` tokens give ``N`` scores). Modes: every registered cache policy and
``recompute`` (the oracle, :mod:`.recompute`); methods ``token`` (:meth:`Decoder.step` per
token) and ``parallel`` (chunks through :meth:`Decoder.prefill`, equal to it; not for
score-based caches, whose prefill evicts once a chunk). docs/ppl.md has the details.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import flash_prefill_enabled
from ..cache import KV_DTYPES, POLICIES, POSITION_MODES, CacheConfig, PolicyConfig
from ..engine import REFERENCE_CHUNK, Decoder
from ..errors import ConfigError, InputError, NonFiniteError
from ..models.transformer import Transformer
from . import policy_modes
from . import recompute as rc
from .token_steps import STEPS, token_steps

RING_MODES = ("dense", "window", "streaming", "recompute")  # the fields below describe them
MODES = tuple(POLICIES) + ("recompute",)
METHODS = ("parallel", "token")
FLASH_EVAL_CHUNK = 4096  # float32 logits of a chunk: 4096 x 50k vocab = 0.8 GB


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: the mode, its cache numbers and the method (None: ``token`` for
    score-based policies, else ``parallel``). Modes outside :data:`RING_MODES` take the
    policy's options in ``options`` (``EvalSpec(mode="h2o", options={"heavy": 124})``); the
    fields are then filled from the policy's config."""

    mode: str = "streaming"
    sink: int = 4
    window: int = 1020
    compress_every: int = 1
    position_mode: str = "cache"
    kv_dtype: str = "auto"
    method: str | None = None
    chunk_size: int | None = None  # parallel: tokens per forward pass (None: see above)
    prefill_kernel: str = "auto"  # parallel: attention.PREFILL_KERNELS
    recompute_batch: int | None = None  # recompute/parallel: contexts per pass (None: auto)
    options: dict = field(default_factory=dict)  # modes outside RING_MODES: the policy's

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mode not in RING_MODES:
            return policy_modes.fill(self, METHODS)
        if self.options:
            raise ConfigError(f"mode {self.mode} takes its numbers in the fields (sink, "
                              f"window, ...), not options {sorted(self.options)}")
        if self.method is None:
            object.__setattr__(self, "method", "parallel")
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {METHODS}")
        if self.position_mode not in POSITION_MODES:
            raise ConfigError(f"position mode {self.position_mode!r} is not one of "
                              f"{POSITION_MODES}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {self.kv_dtype!r} is not one of {KV_DTYPES}")
        for name in ("sink", "window", "compress_every", "chunk_size"):
            v = getattr(self, name)
            if name == "chunk_size" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        if (self.sink < 0 or self.window < 1 or self.compress_every < 1
                or (self.chunk_size is not None and self.chunk_size < 1)):
            raise ConfigError("need sink >= 0, window >= 1, compress_every >= 1, "
                              f"chunk_size >= 1; got {self.sink}, {self.window}, "
                              f"{self.compress_every}, {self.chunk_size}")
        if self.recompute_batch is not None and self.recompute_batch < 1:
            raise ConfigError(f"recompute_batch must be >= 1, got {self.recompute_batch}")
        if self.mode == "window" and self.sink:
            raise ConfigError(f"mode window keeps no sinks (sink={self.sink}); use mode "
                              "streaming for sinks + window")
        if self.mode == "recompute":
            if self.compress_every != 1:
                raise ConfigError("recompute re-encodes every context; compress_every "
                                  f"(={self.compress_every}) does not apply")
            if self.kv_dtype != "auto":
                raise ConfigError("recompute keeps no cache; kv_dtype does not apply")

    @classmethod
    def for_policy(cls, c: PolicyConfig, **kw) -> EvalSpec:
        """The evaluation of the cache ``c`` (the registry's ``ppl_cache``): ring policies by
        the fields, the others by their options."""
        if c.policy not in RING_MODES:
            return cls(mode=c.policy, options={k: v for k, v in c.to_dict().items()
                                               if k != "policy"}, **kw)
        window = {} if c.max_tokens is not None else {"window": c.budget - c.sink}
        return cls(mode=c.policy, sink=c.sink, compress_every=c.compress_every,
                   position_mode=c.position_mode, kv_dtype=c.kv_dtype, **window, **kw)

    def cache_config(self, n_tokens: int) -> PolicyConfig | None:
        """The cache this mode runs through (``None`` for recompute)."""
        if self.mode not in RING_MODES:
            return CacheConfig(policy=self.mode, **self.options)
        if self.mode == "dense":
            return CacheConfig(policy="dense", sink=0, max_len=max(n_tokens, 1),
                               position_mode=self.position_mode, kv_dtype=self.kv_dtype)
        if self.mode == "recompute":
            return None
        return CacheConfig(policy=self.mode, sink=self.sink if self.mode == "streaming" else 0,
                           window=self.window, compress_every=self.compress_every,
                           position_mode=self.position_mode, kv_dtype=self.kv_dtype)

    @property
    def label(self) -> str:
        """A short name: ``dense``, ``window-1024``, ``streaming-4+1020``, ``...-R32``,
        ``recompute-1024`` or ``recompute-4+1020``."""
        if self.mode == "dense":
            return "dense"
        if self.mode not in RING_MODES:
            return policy_modes.label(self)
        if self.mode == "window" or (self.mode == "recompute" and not self.sink):
            base = f"{self.mode}-{self.window}"
        else:
            base = f"{self.mode}-{self.sink}+{self.window}"
        if self.compress_every > 1:
            base += f"-R{self.compress_every}"
        if self.position_mode != "cache" and self.mode != "recompute":
            base += f"-{self.position_mode}"
        if self.kv_dtype != "auto":
            base += f"-kv{self.kv_dtype}"
        return base

    def to_dict(self) -> dict:
        return asdict(self)

    def chunk_for(self, device) -> int:
        """Tokens per parallel pass on ``device`` (``chunk_size``, or the default)."""
        if self.chunk_size is not None:
            return self.chunk_size
        flash = flash_prefill_enabled(self.prefill_kernel, device)
        return FLASH_EVAL_CHUNK if flash else REFERENCE_CHUNK


def attended(spec: EvalSpec, n: int, cache=None) -> np.ndarray:
    """Keys the query of step ``t`` attends to (itself included), for t in 0..n-1, from the
    cache arithmetic (``KVCache.window_held``)."""
    t = torch.arange(n, dtype=torch.long)
    if spec.mode == "dense":
        return (t + 1).numpy()
    if spec.mode == "recompute":
        return torch.clamp(t + 1, max=spec.sink + spec.window + 1).numpy()
    if cache is None:
        from ..cache import make_cache

        cfg = spec.cache_config(n)
        cache = make_cache(cfg, _ShapeOnly, torch.float32, "cpu")
    if hasattr(cache, "keys_attended"):  # refresh
        return cache.keys_attended(t).numpy()
    if getattr(cache, "score_based", False):  # holds its budget once full, itself beside
        return torch.clamp(t + 1, max=cache.max_held() + 1).numpy()
    S = cache.sink
    held = cache.window_held(torch.clamp(t - S, min=0))
    return (torch.clamp(t, max=S) + held + 1).numpy()


class _ShapeOnly:  # the smallest spec make_cache accepts (for the arithmetic alone)
    num_layers = num_kv_heads = head_dim = 1
    rotary_dim, rope_theta = 2, 10000.0


@dataclass
class PPLResult:
    spec: EvalSpec
    nll: np.ndarray  # float64 [N]: nll[t] = -log p(x[t+1] | step t's context)
    kv_len: np.ndarray  # int64 [N]: keys step t attends to
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.nll.size)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def segment_ppl(self, size: int) -> list[float]:
        """exp(mean nll) over consecutive segments of ``size`` scored tokens."""
        return segment_ppl(self.nll, size)

    @property
    def dropped(self) -> np.ndarray:
        """Tokens that left the attention span between step t-1 and step t."""
        return dropped_tokens(self.kv_len)


def segment_ppl(nll: np.ndarray, size: int) -> list[float]:
    if size < 1:
        raise ConfigError(f"segment size must be >= 1, got {size}")
    return [math.exp(float(np.mean(nll[s:s + size]))) for s in range(0, len(nll), size)]


def dropped_tokens(kv_len: np.ndarray) -> np.ndarray:
    prev = np.concatenate(([0], kv_len[:-1]))
    return (prev + 1 - kv_len).astype(np.int64)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="tok", leave=False,
                dynamic_ncols=True, mininterval=0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: Transformer, ids, spec: EvalSpec, *, progress: bool = False,
             desc: str | None = None, step: str = "auto", kernels: str = "auto",
             ) -> PPLResult:
    """Feed ``ids[:-1]`` and score each next token (see the module doc); ``step``: how
    method ``token`` runs its steps (:func:`.token_steps.token_steps`)."""
    if step not in STEPS:
        raise ConfigError(f"step {step!r} is not one of {STEPS}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise InputError(f"need at least 2 tokens to score one, got {ids.numel()}")
    vocab = model.spec.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"token ids must be in 0..{vocab - 1} for this model, got "
                         f"{int(ids.min())}..{int(ids.max())}; is the tokenizer the model's?")
    dev = model.device
    ids = ids.to(dev)
    n = ids.numel() - 1
    nll = torch.empty(n, dtype=torch.float32, device=dev)
    bar = _progress(n, progress, desc or spec.label)
    _sync(dev)
    start = time.perf_counter()
    info: dict = {}
    cache = None
    try:
        if spec.mode == "recompute":
            info = _recompute(model, ids, spec, nll, bar)
        else:
            chunk = spec.chunk_for(dev)
            dec = Decoder.build(model, spec.cache_config(n), chunk_size=chunk,
                                prefill_kernel=spec.prefill_kernel)
            cache = dec.cache
            if spec.method == "parallel":
                info["chunk_size"] = chunk
                _chunked_nll(dec, ids, n, chunk, nll, bar)
            else:
                info.update(token_steps(dec, ids, nll, step, bar, kernels))
        _sync(dev)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    out = nll.double().cpu().numpy()
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise NonFiniteError(f"{spec.label}: non-finite NLL at step {bad}: the model's "
                             f"weights hold NaN/Inf, or {model.dtype} overflowed (try "
                             "float32)")  # a FloatingPointError too, as it was
    return PPLResult(spec, out, attended(spec, n, cache).astype(np.int64), seconds, info)


def _chunked_nll(dec: Decoder, ids, n: int, chunk: int, nll, bar) -> None:
    """nll[:n] from ``ids[:n]`` fed through ``dec.prefill`` in chunks (float32 per chunk)."""
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logits = dec.prefill(ids[s:e], all_logits=True)
        nll[s:e] = F.cross_entropy(logits.float(), ids[s + 1:e + 1], reduction="none")
        bar.update(e - s)


def _recompute(model, ids, spec: EvalSpec, nll, bar) -> dict:
    S, W = spec.sink, spec.window
    n = ids.numel() - 1
    y = ids[1:]
    L = S + W + 1
    dense = CacheConfig(policy="dense", sink=0, max_len=L)
    chunk = spec.chunk_for(ids.device)
    if spec.method == "token":
        dec = Decoder.build(model, dense, chunk_size=chunk, prefill_kernel=spec.prefill_kernel)
        for t in range(n):
            dec.reset()
            logits = dec.prefill(rc.context_ids(ids, t, S, W))
            nll[t] = F.cross_entropy(logits.float()[None], y[t:t + 1])
            bar.update(1)
        return {}
    # Contexts of steps 0 .. L-1 are the prefixes of the text: one dense chunked pass.
    head = min(n, L)
    dec = Decoder.build(model, dense, chunk_size=chunk, prefill_kernel=spec.prefill_kernel)
    _chunked_nll(dec, ids, head, chunk, nll, bar)
    # Steps L .. n-1: full-length contexts [0:S] + [t-W : t+1], batched.
    batch = spec.recompute_batch or rc.auto_batch(L, ids.device)
    sinks = ids[:S]
    offs = torch.arange(-W, 1, device=ids.device)
    for s in range(head, n, batch):
        e = min(s + batch, n)
        steps = torch.arange(s, e, device=ids.device)
        win = ids[steps[:, None] + offs[None, :]]  # [B, W+1]
        ctx = torch.cat((sinks.expand(e - s, S), win), dim=1) if S else win
        logits = rc.last_logits_batched(model, ctx)
        nll[s:e] = F.cross_entropy(logits.float(), y[s:e], reduction="none")
        bar.update(e - s)
    return {"recompute_batch": batch, "context_len": L}


__all__ = ["EvalSpec", "PPLResult", "MODES", "RING_MODES", "METHODS", "evaluate", "attended",
           "segment_ppl", "dropped_tokens"]
