"""Compiled and CUDA-graphed decode steps: ``--compile none|default|graphs`` and
``--kernels auto|fused|inductor`` (docs/gpu.md).

``none`` runs :meth:`Decoder.eager_step`, ``default`` it through ``torch.compile`` (inductor)
or :class:`fastdecode.fused.FusedStep` (fused), ``graphs`` captures either by hand as one
CUDA graph over the decoder's static buffers (cudagraph trees would copy the caches), the
greedy token and position advanced on the device. Warm-up and capture run at position ``t``,
whose slot no later query sees (cache/base.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .config import GEMV_MODES, KERNEL_MODES, CompileConfig
from .errors import ConfigError, DeviceError

aten = torch.ops.aten

# One code object traced once per decoder (own buffers, static shapes): allow many.
_RECOMPILE_LIMIT = 256


def greedy_step(decoder, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits [V] of ``tok`` at ``pos``; writes the greedy next token into ``tok`` and
    advances ``pos`` (the function that is compiled and captured)."""
    logits = decoder.eager_step(tok, pos)
    tok.copy_(torch.argmax(logits, dim=-1, keepdim=True))
    pos.add_(1)
    return logits


def forced_step(inner: Callable, text: torch.Tensor, nll: torch.Tensor, tok: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
    """Teacher forcing (eval.ppl's token method): ``tok = text[pos]``, ``inner`` (greedy_step's
    contract), then the NLL of ``text[pos + 1]`` into ``nll[pos]``: no host sync, graphable."""
    tok.copy_(text[pos])
    logits = inner(tok, pos)  # pos is t + 1 from here
    target = text[pos]
    nll.index_copy_(0, pos - 1, torch.nn.functional.cross_entropy(
        logits.float()[None], target).reshape(1))
    return logits


def _is_one_row(x: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return x.dim() == 2 and x.dtype.is_floating_point and statically_known_true(x.shape[0] == 1)


def _gemv(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """[1, K] @ [K, N] as a float32 multiply + sum, one inductor reduction with its consumers
    fused (gpt-fast's setting); the identity ``as_strided`` realizes ``x`` once (docs/gpu.md)."""
    x = aten.as_strided(x, x.shape, x.stride(), x.storage_offset())
    return (x.float().unsqueeze(2) * w_t.float().unsqueeze(0)).sum(dim=1)


def _decompositions(reduction_gemv: bool) -> dict:
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    if not reduction_gemv:
        return table
    base_addmm, base_mm = table.get(aten.addmm.default), table.get(aten.mm.default)

    def addmm(bias, mat1, mat2, *, beta=1, alpha=1):
        if not _is_one_row(mat1):
            return base_addmm(bias, mat1, mat2, beta=beta, alpha=alpha) if base_addmm \
                else NotImplemented
        out = _gemv(mat1, mat2)
        out = out if alpha == 1 else out * alpha
        return (out + (bias.float() if beta == 1 else bias.float() * beta)).to(mat1.dtype)

    def mm(mat1, mat2):
        if not _is_one_row(mat1):
            return base_mm(mat1, mat2) if base_mm else NotImplemented
        return _gemv(mat1, mat2).to(mat1.dtype)

    table[aten.addmm.default] = addmm
    table[aten.mm.default] = mm
    return table


def resolve_gemv(gemv: str, device: torch.device) -> str:
    if gemv not in GEMV_MODES:
        raise ConfigError(f"gemv {gemv!r} is not one of {GEMV_MODES}")
    return ("reduction" if device.type == "cuda" else "extern") if gemv == "auto" else gemv


def inductor_backend(gemv: str) -> Callable:
    """Inductor with our GEMV decomposition (``reduction``) or BLAS (``extern``); the
    FX-graph and AOT caches are off: their keys do not cover a decomposition table."""
    from torch._inductor.compile_fx import compile_fx

    reduction = gemv == "reduction"
    table = _decompositions(reduction)
    patches = {"coordinate_descent_tuning": reduction, "fx_graph_cache": False,
               "triton.unique_kernel_names": True}

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=patches, decompositions=table)

    return backend


def resolve_kernels(kernels: str, mode: str, decoder) -> str:
    """``eager`` for mode none, else ``fused`` or ``inductor`` (auto: fused where supported)."""
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"kernels {kernels!r} is not one of {KERNEL_MODES}")
    if mode == "none":
        return "eager"
    dev = decoder.model.device
    if not getattr(decoder.cache, "fused", True):  # a policy the fused step cannot run
        if kernels == "fused":
            raise ConfigError(f"the fused decode step does not run the {decoder.cache.name} "
                              "policy yet; use --kernels inductor (or auto)")
        return "inductor"
    if kernels == "auto":
        if dev.type != "cuda":
            return "inductor"
        from .fused import unsupported_reason

        return "inductor" if unsupported_reason(decoder) else "fused"
    if kernels == "fused" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError("the fused decode step runs Triton kernels on CUDA (on the CPU only "
                          "under TRITON_INTERPRET=1, for tests); use --kernels inductor")
    return kernels


def _raise_recompile_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit,
                                              4 * _RECOMPILE_LIMIT)


class CompiledStep:
    """A decoder's step in one of the three modes: :attr:`Decoder.step_fn`, and
    :meth:`greedy` to decode on the device with no host sync."""

    def __init__(self, decoder, mode: str = "none", gemv: str = "auto", warmup: int = 3,
                 kernels: str = "auto", options=None, forced=None):
        """``forced``: (text int64 [N + 1], nll float32 [N]): :func:`forced_step` steps."""
        CompileConfig(mode, kernels)  # validates the mode
        wrap = ((lambda f: functools.partial(forced_step, f, *forced)) if forced is not None
                else (lambda f: f))
        self.decoder, self.mode = decoder, mode
        dev = decoder.model.device
        self.kernels = resolve_kernels(kernels, mode, decoder)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_logits: torch.Tensor | None = None
        if mode == "graphs" and dev.type != "cuda":
            raise DeviceError("--compile graphs captures a CUDA graph and needs the model on "
                              f"a CUDA device; this model is on {dev} (use --compile default)")
        if self.kernels == "fused":
            from .fused import FusedOptions, FusedStep

            self.gemv = self.attention = "fused"
            self._fn = FusedStep(decoder, options if options is not None
                                 else FusedOptions.from_env())
            self.priority = self._fn.priority
            self._fn = wrap(self._fn)
            if mode == "graphs":
                self._capture(warmup)
            return
        self.priority = False
        self._fn = wrap(functools.partial(greedy_step, decoder))
        if mode == "none":
            self.gemv = self.attention = "eager"
            return
        self.gemv, self.attention = resolve_gemv(gemv, dev), "inductor"  # attend, compiled
        _raise_recompile_limits()
        self._fn = torch.compile(self._fn, fullgraph=True, dynamic=False,
                                 backend=inductor_backend(self.gemv))
        if mode == "graphs":
            self._capture(warmup)

    def fn(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The greedy step, not graphed (under no_grad: compiled code specialises on it)."""
        with torch.no_grad():
            return self._fn(tok, pos)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        dec = self.decoder
        dec.cache.check_room(dec.t + 1)
        dev = dec.model.device
        t = dec.t

        def reset():  # every warm-up writes the same (invisible) slot, see module doc
            dec.tok_buf.fill_(0)
            dec.pos_buf.fill_(t)

        # score-based caches: a warm-up evicts, and the next one would write its K/V over
        # the evicted (restored) token's slot, so the state is restored after each of them
        snap = getattr(dec.cache, "snapshot", None)
        snap = snap() if snap is not None else None
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):  # the first call compiles and tunes
                reset()
                self.fn(dec.tok_buf, dec.pos_buf)
                if snap is not None:
                    dec.cache.restore(snap)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        reset()
        # graph nodes keep their stream's priority (fused.step.choose_priority)
        prio = torch.cuda.Stream(dev, priority=-1) if self.priority else None  # fused only
        with torch.cuda.graph(graph, stream=prio):
            out = self.fn(dec.tok_buf, dec.pos_buf)
        torch.cuda.synchronize(dev)
        reset()
        self.graph, self.static_logits = graph, out

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            if self.mode == "none" and self._fn.func is greedy_step:
                return self.decoder.eager_step(tok, pos)
            out = self.fn(tok, pos)
            return out.clone() if self.kernels == "fused" else out  # a static buffer
        dec = self.decoder
        if tok is not dec.tok_buf:
            dec.tok_buf.copy_(tok.reshape(1))
        if pos is not dec.pos_buf:
            dec.pos_buf.copy_(pos.reshape(1))
        self.graph.replay()
        return self.static_logits.clone()  # the graph overwrites its output next replay

    def run_one(self) -> None:
        """One greedy step on the decoder's buffers."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(self.decoder.tok_buf, self.decoder.pos_buf)

    @torch.no_grad()
    def greedy(self, first_token: torch.Tensor | int, n: int, *, record: bool = True,
               events: list | None = None) -> torch.Tensor | None:
        """Feed ``first_token``, then ``n - 1`` greedy successors; the ``n`` tokens that follow
        (None without ``record``); ``events`` (n + 1 CUDA events) are recorded around each step."""
        dec = self.decoder
        if n < 1:
            return torch.empty(0, dtype=torch.long, device=dec.model.device) if record else None
        dec.cache.check_room(dec.t + n)
        dec.tok_buf.copy_(torch.as_tensor(first_token).reshape(1))
        dec.pos_buf.fill_(dec.t)
        out = torch.empty(n, dtype=torch.long, device=dec.model.device) if record else None
        for i in range(n):
            if events is not None:
                events[i].record()
            self.run_one()
            if record:
                out[i:i + 1].copy_(dec.tok_buf)
        if events is not None:
            events[n].record()
        dec.t += n
        return out


def compile_decoder(decoder, mode: str = "none", *, gemv: str = "auto", warmup: int = 3,
                    kernels: str = "auto", options=None) -> CompiledStep:
    """Set ``decoder.step_fn`` for ``mode`` and ``kernels`` and return the step (``options``:
    the fused step's, None: from the environment); ``default`` compiles on the first step."""
    step = CompiledStep(decoder, mode, gemv=gemv, warmup=warmup, kernels=kernels,
                        options=options)
    decoder.step_fn = decoder.eager_step if mode == "none" else step
    decoder.compiled = step
    return step


__all__ = ["CompiledStep", "compile_decoder", "greedy_step", "forced_step", "inductor_backend",
           "GEMV_MODES", "KERNEL_MODES", "resolve_kernels", "resolve_gemv"]
