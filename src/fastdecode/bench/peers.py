"""Peers timed in the same run, on the same shapes and clock as our engine: transformers
eager and static cache + compile, torchao, and the team's StreamingLLM (docs/design.md,
"Measuring"; docs/study.md, "Peers")."""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from .peers_team import TeamStreaming
from .peers_torchao import TORCHAO, PeerUnavailable, torchao_quantize
from .tpot import Clock, stats_ms

PEERS = ("hf-eager", "hf-static-compile", "hf-torchao-int8", "hf-torchao-int4-mlp-g128",
         "team-streaming", "team-streaming-lazy")


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
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def hf_from_source(source: str, dtype: torch.dtype, device: torch.device):
    """The transformers model of a real checkpoint: a HF directory, a GGUF file, or the
    bundled smollm2-135m (its GGUF), read offline."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ..models import weights

    path = Path(weights.smollm2_gguf_path() if source == "smollm2-135m" else source)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=dtype,
                                                 local_files_only=True, **kw)
    return model.to(device).eval().requires_grad_(False)


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
    clock = Clock(dev, reset_peak=True)
    cache = DynamicCache(config=model.config)

    def step(ids, **kw):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    tok, prefill_ms = clock.timed(lambda: step(prompt[None], logits_to_keep=1))
    times = clock.per_step(step, n, tok)
    return _result("hf-eager", times, warmup, prefill_ms, 0.0, prompt.numel(),
                   prompt.numel() + n, dev)


def _decode_one(model, cur_token, cache_position, past_key_values):
    logits = model(cur_token, cache_position=cache_position, past_key_values=past_key_values,
                   return_dict=False, use_cache=True)[0]
    return torch.argmax(logits[:, -1], dim=-1)[:, None]


@torch.no_grad()
def run_hf_static_compile(model, prompt: torch.Tensor, n: int, warmup: int,
                          name: str = "hf-static-compile") -> dict:
    """HF StaticCache + torch.compile. The first 3 compiled calls (compile, warm-up,
    cudagraph record) run before timing; ``warmup`` more are discarded."""
    from transformers import StaticCache

    dev = prompt.device
    clock = Clock(dev, reset_peak=True)
    mode = "reduce-overhead" if clock.cuda else "default"  # cudagraphs need CUDA
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
    def one(tok):
        tok = step(model, tok.clone(), cache_position, cache)
        cache_position.add_(1)
        return tok

    times = clock.per_step(one, n, tok)
    return _result(name, times, warmup, prefill_ms, compile_s, P, P + n + first_calls, dev)


@torch.no_grad()
def run_team_streaming(model, prompt: torch.Tensor, n: int, warmup: int, *, sink: int = 4,
                       window: int = 2048, lazy_every: int = 1,
                       name: str = "team-streaming") -> dict:
    dev = prompt.device
    clock = Clock(dev, reset_peak=True)
    team = TeamStreaming(model, sink, window, lazy_every)
    logits, prefill_ms = clock.timed(lambda: team.step(prompt))
    times = clock.per_step(lambda tok: team.step(tok).argmax(-1, keepdim=True), n,
                           logits.argmax(-1, keepdim=True))
    out = _result(name, times, warmup, prefill_ms, 0.0, prompt.numel(), team.held(), dev)
    out.update(sink=sink, window=window, lazy_every=lazy_every)
    return out


def run_peer(name: str, model, prompt: torch.Tensor, n: int, warmup: int, *,
             streaming: tuple[int, int] = (4, 2048), lazy_every: int = 32) -> dict:
    """One peer on ``model`` (the torchao peers quantize it in place: give them a fresh one)."""
    if name == "hf-eager":
        return run_hf_eager(model, prompt, n, warmup)
    if name in TORCHAO:
        torchao_quantize(model, TORCHAO[name])
        return run_hf_static_compile(model, prompt, n, warmup, name=name)
    if name.startswith("team-streaming"):
        return run_team_streaming(model, prompt, n, warmup, sink=streaming[0],
                                  window=streaming[1], name=name,
                                  lazy_every=lazy_every if name.endswith("-lazy") else 1)
    return run_hf_static_compile(model, prompt, n, warmup)


def run_peers(names, spec, dtype, device, prompt: torch.Tensor, n: int, warmup: int,
              log=print, **peer_kw) -> dict:
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
            # the torchao peers quantize in place: each gets a fresh model of the shapes
            m = hf_model(spec, dtype, device) if name in TORCHAO else model
            results[name] = run_peer(name, m, prompt, n, warmup, **peer_kw)
            r = results[name]
            log(f"peer {name}: TPOT median {r['tpot_ms']['median']:.3f} ms "
                f"(compile {r['compile_s']:.1f} s)")
        except PeerUnavailable as e:
            results[name] = {"peer": name, "skipped": str(e)}
            log(f"peer {name} skipped: {e}")
        except Exception as e:  # noqa: BLE001 - one failing peer must not hide the rest
            results[name] = {"peer": name, "error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"peer {name} FAILED: {results[name]['error'][:500]}")
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return results
