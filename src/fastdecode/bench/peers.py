"""Peers timed in the same run and on the same shapes: Hugging Face transformers.

- ``hf-eager``: the model's own forward with a ``DynamicCache`` (what ``generate`` does by
  default), one call per token.
- ``hf-static-compile``: a ``StaticCache`` and the decode step compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs through cudagraph
  trees), following the transformers documentation's manual decode loop. Its first calls
  compile and record; they are excluded (``compile_s``) together with the warm-up tokens.

Both decode greedily with the token kept on the device and are timed exactly as our engine
is (:class:`fastdecode.bench.tpot.Clock`: CUDA events, no host sync in the loop). The
model is built from the same shapes (``ModelSpec``) with random weights; speed does not
depend on the values. Dense caches: the peers attend over every token fed so far, so the
prompt given to them sets their KV length (the bench passes the window's length, so their
KV is as long as ours at steady state).
"""

from __future__ import annotations

import json
import time

import torch

from ..errors import ConfigError
from .tpot import Clock, stats_ms

PEERS = ("hf-eager", "hf-static-compile")


def hf_config(spec):
    """A transformers config with our spec's shapes (the family's config.json mapping)."""
    from transformers import AutoConfig

    d = spec.arch.hf_config(spec)
    d["max_position_embeddings"] = max(spec.max_position, 2048)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def hf_model(spec, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(spec)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _result(name, times, warmup, prefill_ms, compile_s, prompt_len, kv_len, device) -> dict:
    sel = times[warmup:]
    out = {"peer": name, "tpot_ms": stats_ms(sel), "all_tokens_ms": stats_ms(times),
           "prefill_ms": prefill_ms, "compile_s": compile_s, "prompt_len": prompt_len,
           "decode_len": len(times), "warmup_tokens": warmup, "kv_len_at_end": kv_len,
           # time to first token (the forward of the prompt, last logits only) and total:
           # that plus every timed decode step (compilation and warm-up calls excluded)
           "ttft_ms": prefill_ms, "total_ms": prefill_ms + sum(times)}
    out["tokens_per_s"] = 1e3 / out["tpot_ms"]["median"]
    if torch.device(device).type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


@torch.no_grad()
def run_hf_eager(model, prompt: torch.Tensor, n: int, warmup: int) -> dict:
    from transformers import DynamicCache

    dev = prompt.device
    clock = Clock(dev)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    cache = DynamicCache(config=model.config)
    out, prefill_ms = clock.timed(lambda: model(input_ids=prompt[None], past_key_values=cache,
                                                use_cache=True, logits_to_keep=1))
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    marks = clock.marks(n + 1)
    for i in range(n):
        clock.record(marks, i)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    clock.record(marks, n)
    times = clock.deltas_ms(marks)
    return _result("hf-eager", times, warmup, prefill_ms, 0.0, prompt.numel(),
                   prompt.numel() + n, dev)


def _decode_one(model, cur_token, cache_position, past_key_values):
    logits = model(cur_token, cache_position=cache_position, past_key_values=past_key_values,
                   return_dict=False, use_cache=True)[0]
    return torch.argmax(logits[:, -1], dim=-1)[:, None]


@torch.no_grad()
def run_hf_static_compile(model, prompt: torch.Tensor, n: int, warmup: int,
                          mode: str = "reduce-overhead") -> dict:
    """HF StaticCache + torch.compile. The first 3 compiled calls (compile, warm-up,
    cudagraph record) run before timing; ``warmup`` more are discarded."""
    from transformers import StaticCache

    dev = prompt.device
    clock = Clock(dev)
    if not clock.cuda and mode == "reduce-overhead":
        mode = "default"  # cudagraphs need CUDA
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    P = prompt.numel()
    first_calls = 3
    cache = StaticCache(config=model.config, max_cache_len=P + n + first_calls + 1)
    pos = torch.arange(P, device=dev)

    def prefill():
        return model(input_ids=prompt[None], cache_position=pos, past_key_values=cache,
                     use_cache=True, logits_to_keep=1)

    # Timed cold: a second prefill into the same StaticCache overruns it (index_copy out
    # of bounds on CUDA, transformers 5.17), so their TTFT includes first-call work.
    out, prefill_ms = clock.timed(prefill)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    step = torch.compile(_decode_one, mode=mode, fullgraph=True)
    cache_position = torch.tensor([P], device=dev)
    t0 = time.perf_counter()
    for _ in range(first_calls):
        tok = step(model, tok.clone(), cache_position, cache)
        cache_position += 1
    clock.sync()
    compile_s = time.perf_counter() - t0
    marks = clock.marks(n + 1)
    for i in range(n):
        clock.record(marks, i)
        tok = step(model, tok.clone(), cache_position, cache)
        cache_position += 1
    clock.record(marks, n)
    times = clock.deltas_ms(marks)
    return _result("hf-static-compile", times, warmup, prefill_ms, compile_s, P,
                   P + n + first_calls, dev)


def run_peers(names, spec, dtype, device, prompt: torch.Tensor, n: int, warmup: int,
              log=print) -> dict:
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    results = {}
    if not names:
        return results
    t0 = time.perf_counter()
    model = hf_model(spec, dtype, device)
    log(f"peers: built the transformers model in {time.perf_counter() - t0:.1f} s")
    for name in names:
        try:
            fn = run_hf_eager if name == "hf-eager" else run_hf_static_compile
            results[name] = fn(model, prompt, n, warmup)
            r = results[name]
            log(f"peer {name}: TPOT median {r['tpot_ms']['median']:.3f} ms "
                f"(compile {r['compile_s']:.1f} s)")
        except Exception as e:  # noqa: BLE001 - one failing peer must not hide the rest
            results[name] = {"peer": name, "error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"peer {name} FAILED: {results[name]['error'][:500]}")
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return results


def describe(results: dict) -> str:
    return json.dumps({k: v.get("tpot_ms", {}).get("median") for k, v in results.items()})
