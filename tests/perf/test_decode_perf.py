"""The GPU regression suite: every registered configuration, timed and scored.

Per configuration (fastdecode.registry): TPOT at steady state on Pythia-2.8B shapes (bf16,
random weights, cache full), taken by ``fastdecode.bench.tpot.time_config`` exactly as
``fastdecode bench`` takes it (the same lengths, prompt, CUDA-event clock and statistic:
the median of the steady-state steps; pytest-benchmark records those per-step times);
the share of the floor at the copy bandwidth measured in this session; the TPOT ratio to
the reference step measured in this session; perplexity on SmolLM2-135M over PG19 book
10146 with the same policy (ppl_cache) and quantization, as a ratio to bf16 streaming;
peak memory. Each test asserts the budgets perf/budgets.toml gives this GPU class
(fastdecode.bench.budgets: absolute, efficiency, ratio, PPL, memory) and records which
applied. Run with ``nox -s gpu`` (history under perf/history/).

FASTDECODE_PERF_PPL_TOKENS=0 skips the perplexity half (speed only: minutes less per run,
for the runs a baseline is recorded from); ``-k`` picks configurations as usual.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

from fastdecode import registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PPL_TOKENS = int(os.environ.get("FASTDECODE_PERF_PPL_TOKENS", "8192"))
BASE_PPL = "bf16-stream-eager"  # same policy as all streaming configs, no quantization
REFERENCE = "bf16-stream-graphs"  # budgets.toml [meta].reference; measured first


def _speed_model(quant: str | None):
    from fastdecode.models import load_model
    from fastdecode.quant import QuantConfig, quantize_model, set_backend

    lm = load_model("pythia-2.8b", dtype=torch.bfloat16, device="cuda")
    if quant:
        quantize_model(lm.model, QuantConfig.parse(quant))
        set_backend(lm.model, "auto")
    return lm


_TPOT: dict[str, float] = {}  # configuration -> median TPOT measured in this session


def _speed(config: str, copy_gbps: float):
    """TPOT and the rest of one configuration, by the bench's own function."""
    from fastdecode.bench.tpot import time_config

    cfg = registry.get(config)
    gc.collect()  # a decoder and its compiled step refer to each other: free the last one's
    torch.cuda.empty_cache()
    lm = _speed_model(cfg.speed_quant)
    dec, step, run = time_config(lm, cfg.speed_cache, cfg.compile.mode,
                                 kernels=cfg.compile.kernels, copy_gbps=copy_gbps)
    _TPOT[config] = run.tpot_ms["median"]
    kernels = step.kernels
    del lm, dec, step
    gc.collect()
    torch.cuda.empty_cache()
    return run, kernels


_PPL_CACHE: dict[str, float] = {}


def _ppl(cfg, ppl_model) -> float:
    """Perplexity of ``cfg``'s policy + quantization on SmolLM2 (cached per setting)."""
    import copy

    from fastdecode.eval.calibration import calibration_for
    from fastdecode.eval.data import load_text, take_tokens, tokenize
    from fastdecode.eval.ppl import EvalSpec, evaluate
    from fastdecode.quant import QuantConfig, quantize_model, set_backend

    c = cfg.ppl_cache
    key = f"{c}|{cfg.quant}"
    if key not in _PPL_CACHE:
        model = ppl_model.model
        if cfg.quant:
            model = copy.deepcopy(model)
            qc = QuantConfig.parse(cfg.quant)
            quantize_model(model, qc, calibration_for(ppl_model, qc))
            set_backend(model, "auto")
        ids = take_tokens(tokenize(load_text("pg19-10146"), ppl_model.tokenizer), PPL_TOKENS,
                          "pg19-10146")
        spec = EvalSpec.for_policy(c)
        _PPL_CACHE[key] = evaluate(model, ids, spec).ppl
    return _PPL_CACHE[key]


@pytest.fixture(scope="session")
def ppl_or_none(request):
    return None if PPL_TOKENS <= 0 else request.getfixturevalue("ppl_model")


@pytest.mark.parametrize("config", sorted(registry.CONFIGS, key=lambda c: (c != REFERENCE, c)))
def test_decode(benchmark, config, gpu, budgets, copy_gbps, budget_lines, ppl_or_none):
    from fastdecode.bench import budgets as bud

    cfg = registry.get(config)
    box = {}
    benchmark.pedantic(lambda: box.update(zip(("run", "kernels"), _speed(config, copy_gbps))),
                       rounds=1, iterations=1)
    run = box["run"]
    if benchmark.stats is not None:  # its figures are ours: the steady-state step times
        benchmark.stats.stats.data[:] = [t / 1e3 for t in run.steady_times_ms]
    tpot_ms = run.tpot_ms["median"]
    ref = bud.reference(budgets)
    if ref not in _TPOT:  # a ratio needs the reference of this session (-k left it out)
        _speed(ref, copy_gbps)
    figures = dict(tpot_ms=tpot_ms, efficiency=run.efficiency, floor_ms=run.floor_ms,
                   copy_gbps=copy_gbps, ref_ratio=tpot_ms / _TPOT[ref],
                   peak_mem_gb=run.peak_mem_gb, bytes_per_token=run.bytes_per_token["total"],
                   achieved_gbps=run.achieved_gbps, compile_s=run.compile_s)
    if ppl_or_none is not None:
        ppl = _ppl(cfg, ppl_or_none)
        figures.update(ppl=ppl, ppl_ratio=ppl / _ppl(registry.get(BASE_PPL), ppl_or_none),
                       ppl_tokens=PPL_TOKENS)
    checks = bud.evaluate(budgets, gpu, config, figures)
    benchmark.extra_info.update(
        config=config, **figures, reference=ref, steady_tokens=run.steady_tokens,
        prompt_len=run.prompt_len, decode_len=run.decode_len, warmup_tokens=run.warmup_tokens,
        window=cfg.speed_cache.to_dict().get("window"), kernels=box["kernels"],
        budgets=[c.to_dict() for c in checks],
        **{f"cfg_{k}": v for k, v in cfg.to_dict().items()
           if isinstance(v, (str, int, float)) and v is not None})
    budget_lines.append(f"{config} on {gpu}: TPOT {tpot_ms:.3f} ms, efficiency "
                        f"{run.efficiency:.3f} at {copy_gbps:.0f} GB/s, x{figures['ref_ratio']:.2f}"
                        f" {ref}")
    budget_lines += [f"  {c.line()}" for c in checks] or ["  no budget applies"]
    if not checks:
        warnings.warn(f"no budget for {config} on {gpu} in perf/budgets.toml (measured "
                      f"TPOT {tpot_ms:.3f} ms, efficiency {run.efficiency:.3f})", stacklevel=1)
    bad = bud.failures(checks)
    assert not bad, f"{config} on {gpu}: " + "; ".join(c.line() for c in bad)
