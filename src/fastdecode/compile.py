"""Compiled and CUDA-graphed decode steps: ``--compile none|default|graphs`` and
``--kernels auto|fused|inductor``.

There are two decode paths: the eager reference (:meth:`Decoder.eager_step`, which
``torch.compile`` wraps as written, attention included) and the fused CUDA step
(:class:`fastdecode.fused.FusedStep`, whose options come in one ``FusedOptions``).

- ``none``: :meth:`Decoder.eager_step` as written (one kernel launch per op).
- ``default``: the step made of compiled kernels, launched one by one. With
  ``kernels="inductor"`` (the default off CUDA): ``torch.compile`` (inductor,
  ``fullgraph=True``, static shapes); works on the CPU too (that is what CI tests). With
  ``kernels="fused"`` (the default on CUDA): our own Triton step (:mod:`fastdecode.fused`:
  six launches on two streams per GPT-NeoX layer, no torch.compile, set up in seconds).
- ``graphs`` (CUDA only): the same step, warmed up on a side stream and captured
  by hand as one ``torch.cuda.CUDAGraph`` over the decoder's static buffers: the token
  ``tok_buf`` and position ``pos_buf`` (int64 [1] on the device), the cache buffers (written
  in place, by index, inside the graph) and a static logits output. A step is then two
  small host-to-device fills and one replay: no host sync, no per-op launches.

Why by hand, not ``mode="reduce-overhead"``: cudagraph trees treat the caches as inputs
they may copy or re-record on, and hand outputs back that the next replay overwrites
("accessing tensor output of CUDAGraphs that has been overwritten"). Here the graph owns
one output buffer, :meth:`CompiledStep.__call__` returns a *clone* of it (so logits a caller
keeps stay valid), and the fast greedy loop (:meth:`CompiledStep.greedy`) never reads it at
all: the captured step also writes the greedy next token into ``tok_buf`` and advances
``pos_buf`` on the device, so consecutive replays chain with no host work in between.

Matrix-vector products (batch-1 decode is all GEMVs): ``gemv="reduction"`` rewrites every
one-row ``mm``/``addmm`` (and inductor does the same for one-row ``bmm`` in attention) as a
multiply + sum reduction that inductor emits as its own Triton kernel, with the bias,
activation and residual adds fused into it and the launch parameters tuned by coordinate
descent (gpt-fast's setting; inductor only does this itself for bias-free ``mm``, and our
Pythia linears have biases). ``gemv="extern"`` leaves them to cuBLAS. ``auto``: reduction
on CUDA, extern on CPU (docs/gpu.md). This is an option of the inductor path only.

Warm-up and capture never disturb what the cache holds: both run at the decoder's current
position ``t``, whose slot holds nothing a later query can see (the ring has room for the
new token, see cache/base.py) and is overwritten by the next real step or the prefill.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .config import GEMV_MODES, KERNEL_MODES, CompileConfig
from .errors import ConfigError, DeviceError

aten = torch.ops.aten

# The compiled step is one code object traced once per decoder (each has its own cache
# buffers and static shapes): allow many before dynamo gives up and runs eagerly.
_RECOMPILE_LIMIT = 256


def greedy_step(decoder, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decode step that also advances the device state: returns the logits [V] of the
    token in ``tok`` at position ``pos``, then writes the greedy next token into ``tok``
    and ``pos + 1`` into ``pos``. This is the function that is compiled and captured."""
    logits = decoder.eager_step(tok, pos)
    tok.copy_(torch.argmax(logits, dim=-1, keepdim=True))
    pos.add_(1)
    return logits


# ----------------------------------------------------------------------------- backend
def _is_one_row(x: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return x.dim() == 2 and statically_known_true(x.shape[0] == 1)


def _gemv(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """[1, K] @ [K, N] as a float32 multiply + reduction over K (inductor: one Triton
    reduction kernel reading each weight row once; consumers fuse into it).

    The activation goes through an identity ``as_strided`` first, which inductor lowers by
    realizing its input: whatever computed ``x`` (GELU, a LayerNorm) is then computed once
    into a small buffer instead of being inlined into the reduction, where it would be
    recomputed for every one of the N output rows (docs/gpu.md)."""
    x = aten.as_strided(x, x.shape, x.stride(), x.storage_offset())
    return (x.float().unsqueeze(2) * w_t.float().unsqueeze(0)).sum(dim=1)


def _decompositions(reduction_gemv: bool) -> dict:
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    if not reduction_gemv:
        return table
    base_addmm, base_mm = table.get(aten.addmm.default), table.get(aten.mm.default)

    def addmm(bias, mat1, mat2, *, beta=1, alpha=1):
        if not _is_one_row(mat1) or not mat1.dtype.is_floating_point:
            return base_addmm(bias, mat1, mat2, beta=beta, alpha=alpha) if base_addmm \
                else NotImplemented
        out = _gemv(mat1, mat2)
        if alpha != 1:
            out = out * alpha
        b = bias.float()
        out = out + (b if beta == 1 else b * beta)
        return out.to(mat1.dtype)

    def mm(mat1, mat2):
        if not _is_one_row(mat1) or not mat1.dtype.is_floating_point:
            return base_mm(mat1, mat2) if base_mm else NotImplemented
        return _gemv(mat1, mat2).to(mat1.dtype)

    table[aten.addmm.default] = addmm
    table[aten.mm.default] = mm
    return table


def resolve_gemv(gemv: str, device: torch.device) -> str:
    if gemv not in GEMV_MODES:
        raise ConfigError(f"gemv {gemv!r} is not one of {GEMV_MODES}")
    if gemv == "auto":
        return "reduction" if device.type == "cuda" else "extern"
    return gemv


def inductor_backend(gemv: str) -> Callable:
    """A torch.compile backend: inductor with our GEMV decomposition (``reduction``) or
    cuBLAS/BLAS (``extern``). The FX-graph and AOT caches are off for it: their keys do not
    cover a custom decomposition table, so a cached graph of the other variant could be
    served."""
    from torch._inductor.compile_fx import compile_fx

    reduction = gemv == "reduction"
    table = _decompositions(reduction)
    patches = {"coordinate_descent_tuning": reduction, "fx_graph_cache": False,
               "triton.unique_kernel_names": True}

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=patches, decompositions=table)

    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernels(kernels: str, mode: str, decoder) -> str:
    """``eager`` for mode none; else ``fused`` or ``inductor`` (``auto``: fused on CUDA
    when the model is supported, inductor otherwise)."""
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
    if kernels == "fused" and dev.type != "cuda" and not _interpreting():
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


# ----------------------------------------------------------------------------- steps
class CompiledStep:
    """A decoder's step in one of the three modes.

    ``step(tok_buf, pos_buf) -> logits`` is what :attr:`Decoder.step_fn` calls;
    :meth:`greedy` decodes ``n`` tokens greedily on the device with no host sync.
    """

    def __init__(self, decoder, mode: str = "none", gemv: str = "auto", warmup: int = 3,
                 kernels: str = "auto", options=None):
        CompileConfig(mode, kernels)  # validates the mode
        if mode != "none" and getattr(decoder.cache, "score_based", False):
            raise ConfigError(f"the {decoder.cache.name} cache runs eagerly for now (compile "
                              "mode none): the compiled and fused steps do not score keys yet")
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
            if mode == "graphs":
                self._capture(warmup)
            return
        self.gemv = resolve_gemv(gemv, dev) if mode != "none" else "eager"
        self.attention = "inductor" if mode != "none" else "eager"  # attention.attend, compiled
        if mode == "none":
            self._fn = functools.partial(greedy_step, decoder)
            return
        _raise_recompile_limits()
        self._fn = torch.compile(functools.partial(greedy_step, decoder), fullgraph=True,
                                 dynamic=False, backend=inductor_backend(self.gemv))
        if mode == "graphs":
            self._capture(warmup)

    def fn(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The (compiled) greedy step, not graphed; always under no_grad (grad mode is part
        of what a compiled function is specialised on)."""
        with torch.no_grad():
            return self._fn(tok, pos)

    # -- capture
    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        dec = self.decoder
        dec.cache.check_room(dec.t + 1)
        dev = dec.model.device
        t = dec.t

        def reset():  # every warm-up writes the same (invisible) slot, see module doc
            dec.tok_buf.fill_(0)
            dec.pos_buf.fill_(t)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):  # the first call compiles and tunes
                reset()
                self.fn(dec.tok_buf, dec.pos_buf)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        reset()
        with torch.cuda.graph(graph, stream=self._capture_stream(dev)):
            out = self.fn(dec.tok_buf, dec.pos_buf)
        torch.cuda.synchronize(dev)
        reset()
        self.graph, self.static_logits = graph, out

    def _capture_stream(self, dev) -> torch.cuda.Stream | None:
        """The stream the graph is captured on (None: PyTorch's capture stream). Where the
        fused step asks for it (``FusedStep.priority``, fused.step.choose_priority), its
        main chain (q/k/v, rotary, attention, the out projection) is captured on a stream
        of a higher priority than its side branch (the MLP): a kernel node keeps the
        priority of the stream it was captured on and PyTorch instantiates graphs with
        per-node priorities, so as SMs free up the block scheduler places attention's
        programs before the MLP GEMV's remaining ones (the GEMVs fill every SM; at one
        priority attention waited for the MLP's programs to drain, then ran alone)."""
        if self.kernels != "fused" or not self._fn.priority:
            return None
        return torch.cuda.Stream(dev, priority=-1)

    # -- Decoder.step_fn
    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            if self.mode == "none":
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
        """One greedy step on the decoder's buffers (tok_buf, pos_buf advance on device)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(self.decoder.tok_buf, self.decoder.pos_buf)

    # -- fast greedy loop
    @torch.no_grad()
    def greedy(self, first_token: torch.Tensor | int, n: int, *, record: bool = True,
               events: list | None = None) -> torch.Tensor | None:
        """Feed ``first_token`` at the decoder's position, then ``n - 1`` greedy successors.

        Returns the ``n`` greedy tokens that follow (int64 [n] on the device), or None with
        ``record=False``. No host sync: the token and position stay on the device. With
        ``events`` (n + 1 CUDA events) event ``i`` is recorded before step ``i`` and the last
        after the final step, so per-token times come from the device's own clock.
        """
        dec = self.decoder
        if n < 1:
            return torch.empty(0, dtype=torch.long, device=dec.model.device) if record else None
        dec.cache.check_room(dec.t + n)
        if isinstance(first_token, torch.Tensor):
            dec.tok_buf.copy_(first_token.reshape(1))
        else:
            dec.tok_buf.fill_(int(first_token))
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
    """Set ``decoder.step_fn`` for ``mode`` (none | default | graphs) and ``kernels``
    (auto | fused | inductor) and return the step.

    ``gemv`` (reduction | extern | auto): the inductor path's GEMV decomposition.
    ``options``: the fused step's ``FusedOptions`` (None: ``FusedOptions.from_env()``).
    ``graphs`` compiles, tunes and captures at once (at the decoder's current position), so
    the call takes as long as the compilation; ``default`` compiles on the first step."""
    step = CompiledStep(decoder, mode, gemv=gemv, warmup=warmup, kernels=kernels,
                        options=options)
    decoder.step_fn = decoder.eager_step if mode == "none" else step
    decoder.compiled = step
    return step


__all__ = ["CompiledStep", "compile_decoder", "greedy_step", "inductor_backend", "GEMV_MODES",
           "KERNEL_MODES", "resolve_kernels", "resolve_gemv"]
