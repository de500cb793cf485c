"""Method ``token`` of the perplexity evaluator teacher-forced on the device (#20 / #23, the
eviction study on CUDA): no host sync (``compile.forced_step``; tests/test_eval_fast.py)."""

from __future__ import annotations

import torch

from ..engine import Decoder

STEPS = ("auto", "none", "default", "graphs")  # auto: graphs on CUDA, else none


def token_steps(dec: Decoder, ids: torch.Tensor, nll: torch.Tensor, step: str, bar,
                 kernels: str = "auto") -> dict:
    """Method ``token``, teacher-forced on the device (compile.forced_step): ``step``
    graphs, default or none (``auto``: graphs on CUDA)."""
    from ..compile import CompiledStep

    if step == "auto":
        step = "graphs" if ids.device.type == "cuda" else "none"
    run = CompiledStep(dec, step, kernels=kernels, forced=(ids, nll))
    n = nll.numel()
    for s in range(0, n, 256):  # in pieces, for the progress bar (no sync)
        run.greedy(ids[s:s + 1], min(256, n - s), record=False)
        bar.update(min(256, n - s))
    return {"step": step if step == "none" else f"{step}:{run.kernels}"}
