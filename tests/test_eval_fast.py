"""The teacher-forced token-by-token evaluator (eval.token_steps.token_steps, compile.forced_step):
input tokens read from the device text, each target's NLL stored on the device, no host
sync, so the step is captured as one CUDA graph (the fused step for H2O/TOVA, torch.compile
for refresh). Held equal to the evaluator it replaced (``Decoder.step`` + a cross_entropy
per token) on random tiny models, every scored policy, float32 and bfloat16; on the CPU the
fused step runs under Triton's interpreter; on CUDA the graphed step (gpu-marked). The
refresh cache's snapshot makes graph warm-ups leave no trace."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")

from fastdecode.compile import CompiledStep  # noqa: E402
from fastdecode.engine import Decoder  # noqa: E402
from fastdecode.errors import ConfigError  # noqa: E402
from fastdecode.eval import EvalSpec, evaluate  # noqa: E402

SPECS = {
    "h2o": EvalSpec(mode="h2o", options=dict(heavy=3, recent=3, sink=1)),
    "h2o-cache": EvalSpec(mode="h2o", options=dict(heavy=2, recent=3, position_mode="cache")),
    "tova": EvalSpec(mode="tova", options=dict(budget=5)),
    "refresh": EvalSpec(mode="refresh", method="token", options=dict(
        sink=2, window=4, refresh=2, refresh_every=3, refresh_select="score")),
    "streaming": EvalSpec(mode="streaming", sink=2, window=5, method="token"),
}
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def _ids(n, vocab=97, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def step_loop(model, ids, spec) -> np.ndarray:
    """The evaluator before: one Decoder.step and one cross_entropy per token."""
    dec = Decoder.build(model, spec.cache_config(ids.numel() - 1))
    out = []
    with torch.no_grad():
        for t in range(ids.numel() - 1):
            logits = dec.step(ids[t:t + 1])
            out.append(float(F.cross_entropy(logits.float()[None], ids[t + 1:t + 2])))
    return np.array(out)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("family", ("tiny-neox", "tiny-llama"))
def test_forced_equals_step_loop(tiny_model_factory, family, dtype):
    model = tiny_model_factory(family, dtype).model
    ids = _ids(24)
    for name, spec in SPECS.items():
        got = evaluate(model, ids, spec)
        assert got.info["step"] == "none"
        np.testing.assert_allclose(got.nll, step_loop(model, ids, spec), rtol=TOL[dtype],
                                   atol=TOL[dtype], err_msg=name)


def test_bad_step():
    with pytest.raises(ConfigError, match="step 'fast' is not one of"):
        evaluate(torch.nn.Linear(1, 1), [1, 2], SPECS["tova"], step="fast")


@pytest.mark.skipif(CUDA, reason="the interpreter run; on CUDA test_graphed_equals_eager")
@pytest.mark.parametrize("name", ("h2o", "tova"))
def test_fused_forced_interpreted(tiny_models, name):
    """The fused step (Triton interpreter) teacher-forced from an empty cache."""
    pytest.importorskip("triton")
    model = copy.deepcopy(tiny_models["tiny-llama"].model)  # the fused step re-points weights
    ids = _ids(10)
    got = evaluate(model, ids, SPECS[name], step="default", kernels="fused")
    assert got.info["step"] == "default:fused"
    np.testing.assert_allclose(got.nll, step_loop(model, ids, SPECS[name]), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("family", ("tiny-neox", "tiny-llama"))
def test_graphed_equals_eager(tiny_model_factory, family, dtype):
    model = copy.deepcopy(tiny_model_factory(family, dtype).model).cuda()
    ids = _ids(40).cuda()
    for name, spec in SPECS.items():
        want = step_loop(model, ids, spec)
        got = evaluate(model, ids, spec, step="graphs")
        kern = "inductor" if name == "refresh" else "fused"
        assert got.info["step"] == f"graphs:{kern}", name
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(got.nll, want, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("select", ("score", "uniform"))
def test_refresh_warmups_leave_no_trace(tiny_models, select):
    """compile.CompiledStep warms a step up at the live position before capturing it: with
    the refresh cache's snapshot restored after each, the state is that of no warm-up, at
    a refresh step (every buffer, scores included)."""
    model = tiny_models["tiny-llama"].model
    spec = EvalSpec(mode="refresh", options=dict(sink=1, window=3, refresh=2, refresh_every=2,
                                                 refresh_select=select))
    ids = _ids(12)
    a, b = (Decoder.build(model, spec.cache_config(12)) for _ in range(2))
    for d in (a, b):
        d.prefill(ids[:8])  # m = 8 - 1 - 3 = 4: step 8 refreshes
    snap = b.cache.snapshot()
    for _ in range(3):
        b.tok_buf.fill_(0)
        b.pos_buf.fill_(8)
        with torch.no_grad():
            b.eager_step(b.tok_buf, b.pos_buf)
        b.cache.restore(snap)
    for d in (a, b):
        d.step(int(ids[8]))
        d.step(int(ids[9]))
    st_a, st_b = a.cache, b.cache
    for x, y in zip([st_a.storage.k, st_a.storage.v, st_a.rpos] + (
            [st_a.score] if select == "score" else []),
            [st_b.storage.k, st_b.storage.v, st_b.rpos] + (
            [st_b.score] if select == "score" else [])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_forced_step_device_contract(tiny_models):
    """The step reads its token from the text and writes nll[t]; pos advances by one."""
    model = tiny_models["tiny-neox"].model
    ids = _ids(6)
    nll = torch.full((5,), -1.0)
    dec = Decoder.build(model, SPECS["tova"].cache_config(5))
    run = CompiledStep(dec, "none", forced=(ids, nll))
    run.greedy(ids[:1], 3, record=False)
    assert dec.t == 3 and int(dec.pos_buf) == 3
    assert (nll[:3] > 0).all() and (nll[3:] == -1).all()
