"""The GPU regression suite: every registered configuration, timed and scored.

Per configuration (fastdecode.registry): TPOT at steady state on Pythia-2.8B shapes (bf16,
random weights, cache full), timed by pytest-benchmark with a synchronising timer (each
round is one decode step followed by torch.cuda.synchronize); perplexity on SmolLM2-135M
over PG19 book 10146 with the same policy (ppl_cache) and quantization, as a ratio to bf16
streaming; peak memory; achieved bandwidth. Each test asserts its budget from
perf/budgets.toml for this GPU class. Run with ``nox -s gpu`` (history under perf/history/).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from fastdecode import registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROUNDS = int(os.environ.get("FASTDECODE_PERF_ROUNDS", "200"))
PPL_TOKENS = int(os.environ.get("FASTDECODE_PERF_PPL_TOKENS", "8192"))
BASE_PPL = "bf16-stream-eager"  # same policy as all streaming configs, no quantization


def _speed_model(quant: str | None):
    from fastdecode.models import load_model
    from fastdecode.quant import QuantConfig, quantize_model, set_backend

    lm = load_model("pythia-2.8b", dtype=torch.bfloat16, device="cuda")
    if quant:
        quantize_model(lm.model, QuantConfig.parse(quant))
        set_backend(lm.model, "auto")
    return lm


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
        window = {} if c.max_tokens is not None else {"window": c.budget - c.sink}
        spec = EvalSpec(mode=c.policy, sink=c.sink, compress_every=c.compress_every,
                        position_mode=c.position_mode, kv_dtype=c.kv_dtype, **window)
        _PPL_CACHE[key] = evaluate(model, ids, spec).ppl
    return _PPL_CACHE[key]


@pytest.mark.parametrize("config", sorted(registry.CONFIGS))
def test_decode(benchmark, config, gpu, budgets, ppl_model):
    import gc

    from fastdecode.bench.tpot import build_and_compile, bytes_per_token, random_prompt

    cfg = registry.get(config)
    gc.collect()  # a decoder and its compiled step refer to each other: free the last one's
    torch.cuda.empty_cache()
    lm = _speed_model(cfg.speed_quant)
    cache_cfg = cfg.speed_cache
    torch.cuda.reset_peak_memory_stats()
    dec, step, compile_s = build_and_compile(lm, cache_cfg, cfg.compile.mode,
                                             kernels=cfg.compile.kernels)
    # Fill the cache (steady state), then time single decode steps.
    prompt_len = 2048 if cache_cfg.max_tokens is not None else cache_cfg.max_held + 1
    logits = dec.prefill(random_prompt(prompt_len, lm.spec.vocab_size, 0, "cuda"))
    dec.tok_buf.copy_(torch.argmax(logits, -1, keepdim=True))
    dec.pos_buf.fill_(dec.t)
    dec.cache.check_room(dec.t + ROUNDS + 20)

    def one_step():
        step.run_one()
        torch.cuda.synchronize()

    benchmark.pedantic(one_step, rounds=ROUNDS, warmup_rounds=20, iterations=1)
    tpot_ms = benchmark.stats.stats.median * 1e3
    nbytes = bytes_per_token(lm.model, dec.cache)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    ppl = _ppl(cfg, ppl_model)
    ppl_ratio = ppl / _ppl(registry.get(BASE_PPL), ppl_model)
    benchmark.extra_info.update(
        config=config, tpot_ms=tpot_ms, ppl=ppl, ppl_ratio=ppl_ratio, ppl_tokens=PPL_TOKENS,
        peak_mem_gb=peak_gb, bytes_per_token=nbytes["total"],
        achieved_gbps=nbytes["total"] / tpot_ms / 1e6, compile_s=compile_s,
        window=cache_cfg.to_dict().get("window"), kernels=step.kernels,
        **{f"cfg_{k}": v for k, v in cfg.to_dict().items()
           if isinstance(v, (str, int, float)) and v is not None})
    budget = budgets.get(config)
    if budget is None:  # a new GPU class: record the run, set budgets from it
        warnings.warn(f"no budget for {config} on {gpu} in perf/budgets.toml (measured "
                      f"TPOT {tpot_ms:.3f} ms, PPL ratio {ppl_ratio:.4f}, {peak_gb:.2f} GB)",
                      stacklevel=1)
        return
    problems = []
    if tpot_ms > budget["tpot_ms"]:
        problems.append(f"TPOT {tpot_ms:.3f} ms > budget {budget['tpot_ms']} ms")
    if ppl_ratio > budget["ppl_ratio"]:
        problems.append(f"PPL ratio {ppl_ratio:.4f} > budget {budget['ppl_ratio']}")
    if peak_gb > budget["peak_mem_gb"]:
        problems.append(f"peak memory {peak_gb:.2f} GB > budget {budget['peak_mem_gb']} GB")
    assert not problems, f"{config} on {gpu}: " + "; ".join(problems)
