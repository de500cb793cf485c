"""Decode timing (TPOT at steady state, prefill, totals, memory, bandwidth), one way for
`fastdecode bench` and the perf suite (:func:`time_config`); docs/design.md, "Measuring"."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import atomic
from ..cache import PolicyConfig
from ..errors import ConfigError, NonFiniteError
from ..eval.record import git_info
from .roofline import bytes_per_token, device_bandwidth  # noqa: F401 - shared with the suite

# Greedy steps timed back to back, and the first of them discarded, unless told otherwise.
DECODE_LEN = 256
WARMUP_TOKENS = 32


# ----------------------------------------------------------------------------- clocks
class Clock:
    """CUDA events on CUDA, ``perf_counter`` on the CPU; ``reset_peak``: peak memory from here."""

    def __init__(self, device: torch.device, reset_peak: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        if reset_peak and self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def marks(self, n: int) -> list:
        if self.cuda:
            return [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        return [0.0] * n

    def record(self, marks: list, i: int) -> None:
        if self.cuda:
            marks[i].record()
        else:
            marks[i] = time.perf_counter()

    def deltas_ms(self, marks: list) -> list[float]:
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]

    def per_step(self, fn: Callable, n: int, carry=None) -> list[float]:
        """Milliseconds of each of ``n`` calls ``carry = fn(carry)``, no host sync between."""
        marks = self.marks(n + 1)
        for i in range(n):
            self.record(marks, i)
            carry = fn(carry)
        self.record(marks, n)
        return self.deltas_ms(marks)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> tuple[object, float]:
        """Run ``fn`` and return (its result, milliseconds), synchronised on both ends."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, (time.perf_counter() - t0) * 1e3


def stats_ms(times: list[float]) -> dict:
    if not times:
        return {"n": 0}
    s = sorted(times)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
    return {"mean": statistics.fmean(s), "median": statistics.median(s), "p90": p90,
            "min": s[0], "max": s[-1], "std": statistics.pstdev(s), "n": len(s)}


# ----------------------------------------------------------------------------- environment
def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), **git_info()}
    for mod in ("transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count,
                    gpu_mem_gb=p.total_memory / 1e9, cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,"
                                  "clocks.max.mem", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = out.splitlines()[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ----------------------------------------------------------------------------- one run
@dataclass
class DecodeRun:
    """The figures of one configuration of our engine."""

    mode: str
    gemv: str
    attention: str
    cache: dict
    prompt_len: int
    decode_len: int
    warmup_tokens: int
    tpot_ms: dict = field(default_factory=dict)
    all_tokens_ms: dict = field(default_factory=dict)
    steady: bool = False
    steady_tokens: int = 0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # time to first token: prefill + picking it (= prefill_ms)
    decode_ms: float = 0.0
    total_ms: float = 0.0  # prefill + every decode step, wall clock, synchronised
    compile_s: float = 0.0
    tokens_per_s: float = 0.0
    tokens_per_s_total: float = 0.0
    peak_mem_gb: float | None = None
    bytes_per_token: dict = field(default_factory=dict)
    achieved_gbps: float | None = None
    copy_gbps: float | None = None  # measured in the same run (time_config's caller)
    floor_ms: float | None = None  # bytes_per_token at copy_gbps
    efficiency: float | None = None  # floor_ms / median TPOT
    notes: list = field(default_factory=list)
    kernels: str = ""  # fused | inductor | eager
    steady_times_ms: list = field(default_factory=list, repr=False)  # not in the record

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "steady_times_ms"}


def measure(step, decoder, *, prompt: torch.Tensor, decode_len: int, warmup_tokens: int,
            run_one=None, mode: str | None = None, gemv: str | None = None,
            compile_s: float = 0.0, reset_peak: bool = True) -> DecodeRun:
    """Reset the decoder, prefill ``prompt`` (timed; on CUDA after one untimed prefill), decode
    ``decode_len`` tokens (timed per token) and gather the figures."""
    dev = decoder.model.device
    clock = Clock(dev, reset_peak)
    cache = decoder.cache
    if clock.cuda:  # one untimed prefill first: Triton compiles its kernels per shape
        decoder.reset()
        decoder.prefill(prompt)
    decoder.reset()
    t_start = time.perf_counter()
    clock.sync()
    # Time to first token: the prefill and the pick of the first token, synchronised.
    def first_token():
        out = decoder.prefill(prompt)
        return out, torch.argmax(out, dim=-1, keepdim=True)

    (logits, first), prefill_ms = clock.timed(first_token)
    t_dec = time.perf_counter()
    cache.check_room(decoder.t + decode_len)
    decoder.tok_buf.copy_(first.reshape(1))
    start = decoder.t
    decoder.pos_buf.fill_(start)
    run_one = run_one or step.run_one
    with torch.no_grad():
        times = clock.per_step(lambda _: run_one(), decode_len)
    decoder.t += decode_len
    clock.sync()
    t_end = time.perf_counter()
    check_finite(decoder, logits, step, decode_len)  # after the clocks: nothing timed syncs
    ff = 0 if cache.cfg.max_tokens is not None else cache.cfg.budget - 1  # full from here
    steady_idx = [i for i in range(decode_len) if i >= warmup_tokens and start + i >= ff]
    mode = mode or step.mode
    run = DecodeRun(mode=mode, gemv=gemv or step.gemv,
                    attention="eager" if mode == "none" else step.attention,
                    cache=cache.cfg.to_dict(), kernels=getattr(step, "kernels", ""),
                    prompt_len=int(prompt.numel()), decode_len=decode_len,
                    warmup_tokens=warmup_tokens, compile_s=compile_s)
    run.steady = bool(steady_idx)
    if not steady_idx:
        steady_idx = list(range(min(warmup_tokens, decode_len - 1), decode_len))
        run.notes.append(f"cache not full before the last step (full from position {ff}); "
                         "statistics over all post-warm-up steps")
    sel = [times[i] for i in steady_idx]
    run.steady_tokens, run.steady_times_ms = len(sel), sel
    run.tpot_ms = stats_ms(sel)
    run.all_tokens_ms = stats_ms(times)
    run.prefill_ms = run.ttft_ms = prefill_ms
    run.decode_ms = (t_end - t_dec) * 1e3
    run.total_ms = (t_end - t_start) * 1e3
    run.tokens_per_s = 1e3 / run.tpot_ms["median"]
    run.tokens_per_s_total = decode_len / (run.total_ms / 1e3)
    if clock.cuda:
        run.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
    run.bytes_per_token = bytes_per_token(decoder.model, cache)
    run.achieved_gbps = run.bytes_per_token["total"] / run.tpot_ms["median"] / 1e6
    return run


def check_finite(decoder, prefill_logits: torch.Tensor, step, decode_len: int) -> None:
    """Refuse a run that timed NaN/Inf (logits or KV cache), checked once after the clocks."""
    prompt_len = decoder.t - decode_len
    if not bool(torch.isfinite(prefill_logits).all()):
        raise NonFiniteError(f"non-finite logits (NaN/Inf) after the {prompt_len}-token "
                             "prefill, before decode step 0: the model's weights hold NaN/Inf, "
                             f"or {str(decoder.model.dtype).removeprefix('torch.')} overflowed")
    held = [("the last step's logits", getattr(step, "static_logits", None))]
    held += [(f"KV cache {name}", t) for name, t in vars(decoder.cache.storage).items()
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for name, t in held:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"non-finite values (NaN/Inf) in {name} after {decode_len} "
                                 f"decode steps (positions {prompt_len}..{decoder.t - 1}; "
                                 "checked at the end of the timed decode, not per step)")


def random_prompt(n: int, vocab: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).to(device)


def build_and_compile(lm, cache_cfg: PolicyConfig, mode: str, gemv: str = "auto",
                      chunk_size: int | None = None, kernels: str = "auto", options=None):
    """(a fresh decoder for ``cache_cfg``, its compiled step, seconds compiling and capturing)."""
    from ..compile import compile_decoder
    from ..engine import Decoder

    dec = Decoder.build(lm.model, cache_cfg, chunk_size=chunk_size)
    clock = Clock(lm.model.device)
    step, ms = clock.timed(lambda: compile_decoder(dec, mode, gemv=gemv, kernels=kernels,
                                                   options=options))
    if mode == "default":  # compiles (or tunes) lazily: do it now, at the current position
        def first():
            dec.pos_buf.fill_(dec.t)
            dec.tok_buf.fill_(0)
            step.run_one()
        _, ms2 = clock.timed(first)
        ms += ms2
    return dec, step, ms / 1e3


def default_prompt_len(cache_cfg: PolicyConfig) -> int:
    """The prompt at steady state: a bounded cache's budget, else half the room (<= 2,048)."""
    if cache_cfg.max_tokens is None:
        return cache_cfg.budget
    return min(cache_cfg.max_tokens // 2, 2048)


def time_config(lm, cache_cfg: PolicyConfig, mode: str, *, gemv: str = "auto",
                kernels: str = "auto", chunk_size: int | None = None,
                prompt_len: int | None = None, decode_len: int = DECODE_LEN,
                warmup_tokens: int = WARMUP_TOKENS, seed: int = 0,
                copy_gbps: float | None = None):
    """(decoder, step, DecodeRun) of one configuration: a fresh decoder compiled for ``mode``,
    a random prompt, :func:`measure` (``copy_gbps``: with floor and efficiency)."""
    from .roofline import efficiency, floor_ms

    dev = lm.model.device
    prompt_len = default_prompt_len(cache_cfg) if prompt_len is None else prompt_len
    check_lengths(prompt_len, decode_len, warmup_tokens)
    Clock(dev, reset_peak=True)
    dec, step, compile_s = build_and_compile(lm, cache_cfg, mode, gemv, chunk_size, kernels)
    prompt = random_prompt(prompt_len, lm.spec.vocab_size, seed, dev)
    run = measure(step, dec, prompt=prompt, decode_len=decode_len, warmup_tokens=warmup_tokens,
                  compile_s=compile_s, reset_peak=False)
    if copy_gbps:
        total, med = run.bytes_per_token["total"], run.tpot_ms["median"]
        run.copy_gbps, run.floor_ms = copy_gbps, floor_ms(total, copy_gbps)
        run.efficiency = efficiency(total, med, copy_gbps)
    return dec, step, run


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def compare_steps(ref_dec, dec, prompt: torch.Tensor, n: int) -> dict:
    """Two decoders' logits over ``n`` steps, both fed the reference's greedy tokens."""
    ref_dec.reset()
    dec.reset()
    a = ref_dec.prefill(prompt)
    b = dec.prefill(prompt)
    rel, maxabs, agree = [], [], 0
    tok = torch.argmax(a, -1, keepdim=True)
    for _ in range(n):
        a = ref_dec.step(tok).float()
        b = dec.step(tok).float()
        rel.append(((a - b).norm() / a.norm().clamp_min(1e-30)).item())
        maxabs.append((a - b).abs().max().item())
        agree += int(torch.argmax(a) == torch.argmax(b))
        tok = torch.argmax(a, -1, keepdim=True)
    return {"steps": n, "max_rel_err": max(rel), "mean_rel_err": statistics.fmean(rel),
            "max_abs_err": max(maxabs), "argmax_agree": agree}


# ----------------------------------------------------------------------------- profile
def kernel_category(name: str) -> str:
    """Rough grouping of a decode step's kernels, by name."""
    low = name.lower()
    if any(k in low for k in ("split_kernel", "combine_kernel", "bmm", "softmax", "sdpa",
                              "flash", "attention", "fmha")):
        return "attention"
    if any(k in low for k in ("index_put", "scatter", "index_copy")):
        return "cache_write"
    if low.startswith(("triton_red", "triton_per")) and "mm" in low:
        return "gemv"
    if any(k in low for k in ("gemv", "gemm", "cublas", "xmma", "cutlass", "nvjet", "sm90_")):
        return "gemv"
    if "layer_norm" in low or "rsqrt" in low:
        return "norm"
    if low.startswith("triton_poi"):
        return "pointwise"
    return "other"


def profile_steps(run_one: Callable[[], None], steps: int, trace_path: str | None,
                  device: torch.device) -> dict:
    """torch.profiler over ``steps`` decode steps: a Chrome trace and a per-step kernel summary."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    clock = Clock(device)
    for _ in range(2):
        run_one()
    clock.sync()
    with profile(activities=acts, record_shapes=False) as prof:
        step_ms = statistics.median(clock.per_step(lambda _: run_one(), steps))
    if trace_path:
        with atomic.atomic_path(trace_path, "profile trace") as tmp:
            prof.export_chrome_trace(str(tmp))
    kernels: dict[str, list] = {}
    for ev in prof.events():
        if clock.cuda:  # device kernels (also those replayed from a CUDA graph)
            if "CUDA" not in str(getattr(ev, "device_type", "")):
                continue
            dur = ev.time_range.elapsed_us()
        else:  # CPU: top-level ops
            if getattr(ev, "cpu_parent", None) is not None:
                continue
            dur = ev.cpu_time_total
        if not dur:
            continue
        k = kernels.setdefault(ev.name, [0.0, 0])
        k[0] += dur
        k[1] += 1
    total_us = sum(v[0] for v in kernels.values())
    cats: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        c = kernel_category(name)
        cats[c] = cats.get(c, 0.0) + us / steps / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    launches = sum(v[1] for v in kernels.values()) / steps
    busy_ms = total_us / steps / 1e3
    return {"steps": steps, "trace": str(trace_path) if trace_path else None,
            "step_ms": step_ms, "kernel_ms_per_step": busy_ms,
            "kernels_per_step": launches,
            "idle_ms_per_step": step_ms - busy_ms,
            "by_category_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:160], "ms_per_step": us / steps / 1e3,
                             "calls_per_step": c / steps, "category": kernel_category(n)}
                            for n, (us, c) in top]}


# ----------------------------------------------------------------------------- targets
def target(name: str, value: float | None, limit: float, lower_is_better: bool) -> dict:
    if value is None:
        return {"name": name, "value": None, "target": limit, "met": None}
    met = value <= limit if lower_is_better else value >= limit
    miss = 0.0 if met else (value - limit if lower_is_better else limit - value)
    rel = 0.0 if met else miss / limit
    return {"name": name, "value": value, "target": limit, "met": met, "miss_by": miss,
            "miss_by_rel": rel}


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Write the bench record atomically (see fastdecode.atomic)."""
    atomic.write_json(path, record, what="bench record", default=str)


def check_lengths(prompt_len: int, decode_len: int, warmup_tokens: int) -> None:
    if prompt_len < 1:
        raise ConfigError(f"--prompt-len must be >= 1, got {prompt_len}")
    if decode_len < 2:
        raise ConfigError(f"--decode-len must be >= 2, got {decode_len}")
    if not 0 <= warmup_tokens < decode_len:
        raise ConfigError(f"--warmup-tokens must be in [0, decode-len), got {warmup_tokens}")
