"""H2O and TOVA in the fused decode step (issue 20): token by token, the fused step gives the
logits of the eager score caches and of the reference oracles, and leaves the eager
cache's device buffers (the same tokens in the same slots, the same next slot, its
scores), with the policies' invariants (check_state: the budget, sinks and the recent
window always held, scores = the sums of the probabilities received).

On the CPU the kernels run under Triton's interpreter (slow: a few examples, two steps
each, the tiny presets); on CUDA (``scripts/gpu_bench.sh h2o``) compiled, and graphed.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")
pytest.importorskip("triton")

from fastdecode.cache import H2OConfig, TOVAConfig  # noqa: E402
from fastdecode.compile import compile_decoder  # noqa: E402
from fastdecode.engine import Decoder  # noqa: E402
from fastdecode.fused import FusedOptions  # noqa: E402
from test_score_policies import check_state, reference, rel_err  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
OPTS = FusedOptions.from_env()


def _model(lm):
    return copy.deepcopy(lm.model).to(DEV)  # the fused step re-points its weights


def _run(model, cfg, prompt_len: int, steps: int, seed: int, tol: float = 1e-4):
    """Prefill the eager decoder and the fused one alike, then ``steps`` greedy steps of the
    oracle's tokens through both; after each: logits against each other and the oracle,
    buffers against each other, state against the oracle."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.spec.vocab_size, (prompt_len + steps,), generator=gen)
    # the oracle on the CPU (its dynamic tensors are made there)
    run = reference(copy.deepcopy(model).cpu(), tokens, cfg, chunks=[prompt_len] + [1] * steps,
                    kv_int8=cfg.kv_dtype == "int8")
    eager, fused = Decoder.build(model, cfg), Decoder.build(model, cfg)
    eager.prefill(tokens[:prompt_len].to(DEV))
    fused.prefill(tokens[:prompt_len].to(DEV))
    step = compile_decoder(fused, "default", kernels="fused", options=OPTS)
    assert step.kernels == "fused"
    G = model.spec.num_heads // model.spec.num_kv_heads
    for i in range(steps):
        t = prompt_len + i
        a = eager.step(int(tokens[t])).float().cpu()
        b = fused.step(int(tokens[t])).float().cpu()
        assert torch.isfinite(b).all()
        assert rel_err(b, a) < tol, (i, rel_err(b, a))
        assert rel_err(b, run.logits[t].float().cpu()) < tol
        e, f = eager.cache, fused.cache
        for name in ("pos", "free", "newer"):
            assert torch.equal(getattr(e, name), getattr(f, name)), (name, i)
        torch.testing.assert_close(f.score, e.score, rtol=1e-5, atol=1e-6)
        check_state(f, run.states[i + 1], cfg, t + 1, G)
        assert int(fused.tok_buf) == int(torch.argmax(b))  # the step's greedy token


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(("absolute", "cache")))
    kv = draw(st.sampled_from(("auto", "int8")))
    sink = draw(st.integers(0, 2))
    if draw(st.sampled_from(("h2o", "tova"))) == "h2o":
        heavy = draw(st.integers(0, 4))
        cfg = H2OConfig(heavy=heavy, recent=draw(st.integers(0 if heavy else 1, 4)), sink=sink,
                        position_mode=mode, kv_dtype=kv)
    else:
        cfg = TOVAConfig(budget=draw(st.integers(sink + 1, sink + 6)), sink=sink,
                         position_mode=mode, kv_dtype=kv)
    # at or past the budget (evicting from the first step), or short of it (filling up)
    prompt = draw(st.one_of(st.integers(cfg.budget, cfg.budget + 8), st.integers(1, 8)))
    return cfg, prompt


@given(family=st.sampled_from(["tiny-neox", "tiny-llama"]), case=cases(),
       seed=st.integers(0, 1000))
@settings(max_examples=3)
def test_fused_scored_step_equals_eager_and_oracle(tiny_models, family, case, seed):
    """Random budgets, sinks, prompt lengths, both position modes, int8 KV or not, MHA
    (tiny-neox, partial rotary) and GQA (tiny-llama)."""
    cfg, prompt = case
    _run(_model(tiny_models[family]), cfg, prompt, 2, seed)


def test_fused_scored_int8_kv(tiny_models):
    """int8 KV storage with the scores, past the budget, GQA and position rolling (a fixed
    case beside the property, which draws int8 too)."""
    cfg = H2OConfig(heavy=3, recent=2, sink=1, position_mode="cache", kv_dtype="int8")
    _run(_model(tiny_models["tiny-llama"]), cfg, cfg.budget + 3, 2, seed=3)


@pytest.mark.parametrize("cfg", [TOVAConfig(budget=9, sink=2),
                                 H2OConfig(heavy=4, recent=2, sink=1, position_mode="cache")],
                         ids=["tova", "h2o-cache"])
def test_ties_across_slot_tiles_go_to_the_oldest(tiny_models, cfg):
    """Queries zeroed: every logit is 0, every held token gets the same probability, so
    TOVA's scores all tie (and H2O's new ones): the victim is the oldest evictable token,
    whichever of the combine's slot tiles holds it (the caches span several tiles)."""
    model = _model(tiny_models["tiny-neox"])
    D, H = model.spec.head_dim, model.spec.num_heads
    for layer in model.layers:
        layer.attn.qkv.weight.data[:H * D] = 0
        layer.attn.qkv.bias.data[:H * D] = 0
    from fastdecode.fused import FusedStep
    assert FusedStep(Decoder.build(model, cfg), OPTS).scored.ntiles > 1 or CUDA
    _run(model, cfg, cfg.budget + 2, 3, seed=1)


def test_streaming_launches_carry_no_score_work(tiny_models):
    """The streaming step keeps its one-launch plan and the plain kernels (SCORED off,
    no logits buffer); a score cache switches its sinks off in the kernels (they are plain
    held keys there) and keeps its plan on the device."""
    from fastdecode.cache import CacheConfig
    from fastdecode.fused import FusedStep

    model = _model(tiny_models["tiny-llama"])
    s = FusedStep(Decoder.build(model, CacheConfig(policy="streaming", sink=4, window=8)), OPTS)
    assert s.scored is None and s.plan_slot is not None and s.sink == 4
    h = FusedStep(Decoder.build(model, H2OConfig(heavy=2, recent=2, sink=3)), OPTS)
    assert h.scored is not None and h.plan_slot is None and h.sink == 0
    assert h.scored.free is h.cache.free
    assert h.scored.logit.shape == (model.spec.num_heads, h.cache.slots)


def test_snapshot_restores_what_a_step_changes(tiny_models):
    """Graph capture warms the step up on the live cache: the snapshot taken before puts
    back every buffer a step changes (positions, scores, newer counts, the next slot)."""
    model = _model(tiny_models["tiny-neox"])
    dec = Decoder.build(model, H2OConfig(heavy=2, recent=2, sink=1, position_mode="cache"))
    dec.prefill(torch.arange(9, device=DEV))
    c = dec.cache
    before = [x.clone() for x in (c.pos, c.score, c.newer, c.free)]
    snap = c.snapshot()
    for _ in range(3):
        dec.step(5)
    assert not all(torch.equal(x, y) for x, y in zip(before, (c.pos, c.score, c.newer,
                                                               c.free)))
    c.restore(snap)
    for x, y in zip(before, (c.pos, c.score, c.newer, c.free)):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cfg", [H2OConfig(heavy=24, recent=20, sink=4),
                                 H2OConfig(heavy=16, recent=16, position_mode="cache",
                                           kv_dtype="int8"),
                                 TOVAConfig(budget=40, sink=2)],
                         ids=["h2o", "h2o-cache-int8", "tova"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_fused_scored_matches_eager_cuda(cfg, dtype):
    """--compile graphs, fused: warm-ups and capture leave the cache as it was, and 40
    replays give the eager logits (bf16: evictions may part on near-ties of the scores, so
    only the first steps are held close; fp32: all of them, and the same buffers)."""
    from fastdecode.models import load_model

    lm = load_model("small-neox", dtype=dtype, device="cuda")
    prompt = torch.randint(0, lm.spec.vocab_size, (60,), device="cuda")
    ref, dec = Decoder.build(lm.model, cfg), Decoder.build(lm.model, cfg)
    a = ref.prefill(prompt)
    dec.prefill(prompt)
    snap = dec.cache.snapshot()
    step = compile_decoder(dec, "graphs", kernels="fused")
    assert step.kernels == "fused" and step.graph is not None
    for x, y in zip(snap, dec.cache.snapshot()):
        assert torch.equal(x, y)
    tok = torch.argmax(a, -1, keepdim=True)
    kept = []
    for _ in range(40):
        a, b = ref.step(tok), dec.step(tok)
        kept.append((a, b))
        tok = torch.argmax(a, -1, keepdim=True)
    n = len(kept) if dtype == torch.float32 else 4
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in kept[:n]:
        assert rel_err(b.float(), a.float()) < tol
    if dtype == torch.float32:
        assert torch.equal(ref.cache.pos, dec.cache.pos)
