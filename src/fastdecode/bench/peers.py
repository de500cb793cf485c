"""Peers timed in the same run, on the same shapes and clock as our engine: transformers
eager and static cache + compile, torchao, and the team's StreamingLLM (docs/design.md,
"Measuring"; docs/study.md, "Peers")."""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from .tpot import Clock, stats_ms

PEERS = ("hf-eager", "hf-static-compile", "hf-torchao-int8", "hf-torchao-int4-mlp-g128",
         "team-streaming", "team-streaming-lazy")
TORCHAO = {"hf-torchao-int8": "int8", "hf-torchao-int4-mlp-g128": "int4-mlp-g128"}


class PeerUnavailable(ConfigError):
    """A peer whose optional package is missing: skipped, with a message saying why."""


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


def torchao_quantize(model, kind: str) -> None:
    """torchao 0.18's ``quantize_`` in place: int8 weight-only on every linear, or int4
    group-128 weight-only (tinygemm packing: CUDA, bfloat16) on the MLP linears only."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise PeerUnavailable("torchao is not installed (pip install torchao==0.18.0); the "
                              "torchao peers are skipped") from None
    if kind == "int8":
        quantize_(model, Int8WeightOnlyConfig())
    else:
        quantize_(model, Int4WeightOnlyConfig(group_size=128,
                                              int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and ".mlp." in fqn)


# ----------------------------------------------------------------- the team's StreamingLLM
class _Rotary:
    """cos/sin of the model's own rotary embedding at chosen positions (float32)."""

    def __init__(self, model):
        self.emb = model.base_model.rotary_emb
        self.cos = self.sin = None

    def at(self, positions: torch.Tensor):
        x = torch.empty(0, device=positions.device)
        cos, sin = self.emb(x, positions[None])
        return cos[0, None].float(), sin[0, None].float()  # [1, L, rotary_dim]

    @staticmethod
    def apply(x, cos, sin):
        """x [B, H, L, D] rotated (on its first rotary_dim dims) by the given angles."""
        rd = cos.shape[-1]
        xr, rest = x[..., :rd].float(), x[..., rd:]
        half = torch.cat((-xr[..., rd // 2:], xr[..., :rd // 2]), -1)
        return torch.cat(((xr * cos + half * sin).to(x.dtype), rest), -1)


def _pos_shift_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PosShiftLayer(DynamicLayer):
        """Keys held before RoPE; each call returns every key rotated at its slot 0..L-1."""

        def __init__(self, rotary: _Rotary):
            super().__init__()
            self.rotary = rotary

        def update(self, key_states, value_states, *args, **kwargs):
            r = self.rotary
            raw = r.apply(key_states, r.new_cos, -r.new_sin)  # undo the model's rotation
            super().update(raw, value_states)
            return r.apply(self.keys, r.cos, r.sin), self.values

    return PosShiftLayer


class TeamStreaming:
    """The team's StreamingLLM decode (see the module doc): ``step(ids)`` -> last logits."""

    def __init__(self, model, sink: int, window: int, lazy_every: int = 1):
        from transformers.cache_utils import Cache

        self.model, self.S, self.W, self.R = model, sink, window, lazy_every
        self.rotary = _Rotary(model)
        layer = _pos_shift_layer_class()
        n = model.config.num_hidden_layers
        self.cache = Cache(layers=[layer(self.rotary) for _ in range(n)])

    def held(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        held, q = self.held(), ids.numel()
        pos = torch.arange(held, held + q, device=ids.device)
        r = self.rotary
        r.cos, r.sin = r.at(torch.arange(held + q, device=ids.device))
        r.new_cos, r.new_sin = r.cos[:, held:], r.sin[:, held:]
        out = self.model(input_ids=ids.reshape(1, q), position_ids=pos[None],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.prune(self.S + self.W + (self.R if q == 1 else 1))
        return out.logits[0, -1]

    def prune(self, limit: int) -> None:
        """Start + recent by concatenation once ``limit`` tokens are held."""
        if self.held() < limit:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat((t[..., :self.S, :], t[..., -self.W:, :]), -2))


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


@torch.no_grad()
def team_nll(model, ids: torch.Tensor, *, sink: int, window: int, lazy_every: int = 1):
    """Their perplexity loop: feed one token, score the next, prune; nll per token."""
    import torch.nn.functional as F

    team = TeamStreaming(model, sink, window, lazy_every)
    ids = ids.to(model.device)
    return torch.stack([F.cross_entropy(team.step(ids[t:t + 1]).float(), ids[t + 1])
                        for t in range(ids.numel() - 1)]).double().cpu().numpy()


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
