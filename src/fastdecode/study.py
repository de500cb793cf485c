"""The team's study in one call: a fixed benchmark over a list of configurations.

For each row (a registry configuration, or ``peer:<name>`` from :mod:`fastdecode.bench.peers`)
it measures on the same model TPOT at steady state, TTFT, total time and peak memory for
one shape (:func:`fastdecode.bench.tpot.measure`, the timer bench and the suite use) and
perplexity on each text source (the exact parallel evaluator where ``eval.ppl`` knows the
policy, else token by token). One JSON record per row is written atomically as it finishes
under ``<out>/records/``; a run with the same arguments skips the rows already recorded
(a failed row is tried again). At the end: ``<out>/study.md`` and the TPOT-PPL plot.

A baseline row is measured once (the mean of N runs), stored under ``baseline_store`` and
reused while everything that decides its numbers is unchanged: the model's identity, the
GPU class, the dtype, the row and the shapes (the key), and :func:`timing_code_hash` with
the torch/transformers/triton versions (the validity), optionally no older than
``baseline_max_age_days``. See docs/study.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import atomic, registry
from .bench import peers, peers_team, tpot
from .bench.history import Run, gpu_class
from .config import parse_dtype
from .errors import ConfigError, FastdecodeError
from .eval.data import DataSourceError, load_text, take_tokens, tokenize
from .models import load_model, presets, resolve_device, weights
from .models.hub import resolve_source

PEER = "peer:"
DEFAULT_DATA = ("pg19-10146", "wikitext-2")
# Modules whose code cannot change a measured number (presentation, records, the CLI).
NOT_TIMING = ("commands/", "cli.py", "__main__.py", "study.py", "bench/plots.py",
              "bench/history.py", "bench/compare.py", "eval/plot.py", "eval/record.py")
RECORD_KIND = "fastdecode.study.row"


@dataclass
class Study:
    model: str
    configs: list[str]
    out: Path
    prompt_len: int = 16384
    new_tokens: int = 1024
    warmup_tokens: int = 32
    data: tuple[str, ...] | None = None  # None: DEFAULT_DATA, those that are available
    ppl_tokens: int = 4096
    ppl_model: str | None = None  # None: the model if it has real weights, else smollm2-135m
    device: str = "auto"
    dtype: str | None = None  # None: the configuration's on CUDA, float32 on the CPU
    random_weights: bool = False
    revision: str | None = None
    compile: str | None = None  # one compile mode for every row (e.g. none on a CPU)
    seed: int = 0
    text_column: str = "text"
    split: str | None = None
    peer_sink: int = 4
    peer_window: int = 2048
    peer_lazy_every: int = 32
    baseline: str | None = None
    baseline_runs: int = 1
    baseline_store: Path | None = None
    refresh_baseline: bool = False
    baseline_max_age_days: float | None = None
    sources: list = field(default_factory=list, repr=False)  # resolved by check()


# ---------------------------------------------------------------- identities and keys
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def timing_code_hash(root: Path | None = None) -> str:
    """sha256 of every module of this package that can change a number the study measures
    (all but :data:`NOT_TIMING`): a stored baseline is reused only while it is the same."""
    root = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if not rel.startswith(NOT_TIMING):
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "triton", "torchao"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    return out


def model_identity(name: str, revision: str | None, random_weights: bool, seed: int) -> dict:
    """What the numbers depend on in a model source: its resolved snapshot or path and its
    files' names and sizes (or the preset and seed for random weights)."""
    if name in presets.SHAPE_PRESETS:
        return {"model": f"random:{name}", "seed": seed}
    path, hub = resolve_source(name, revision)
    p = Path(weights.smollm2_gguf_path() if name == "smollm2-135m" else path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    out = {"model": hub or str(p.resolve()),
           "files": _sha([(f.name, f.stat().st_size) for f in files])}
    return out | ({"random_weights": True, "seed": seed} if random_weights else {})


def device_class(dev: torch.device) -> str:
    if dev.type == "cuda":
        return gpu_class(torch.cuda.get_device_name(dev))
    return f"cpu-{platform.machine()}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


# ---------------------------------------------------------------- checking
def _row_def(s: Study, name: str) -> dict:
    """What a row is (part of its keys)."""
    if name.startswith(PEER):
        peer = name[len(PEER):]
        if peer not in peers.PEERS:
            raise ConfigError(f"unknown peer {name!r}; known: "
                              f"{', '.join(PEER + p for p in peers.PEERS)}")
        d = {"peer": peer}
        if peer.startswith("team-streaming"):
            d.update(sink=s.peer_sink, window=s.peer_window,
                     lazy_every=s.peer_lazy_every if peer.endswith("-lazy") else 1)
        return d
    return registry.get(name).to_dict()


def check(s: Study) -> None:
    """Everything cheap, before any model is loaded: names, lengths, text sources."""
    if not s.configs:
        raise ConfigError("give at least one configuration (registry names or peer:<name>)")
    if len(set(s.configs)) != len(s.configs):
        raise ConfigError(f"a configuration is listed twice: {s.configs}")
    for name in s.configs + ([s.baseline] if s.baseline else []):
        _row_def(s, name)
    tpot.check_lengths(s.prompt_len, s.new_tokens, s.warmup_tokens)
    if s.ppl_tokens < 0:
        raise ConfigError(f"--ppl-tokens must be >= 0 (0: no perplexity), got {s.ppl_tokens}")
    if s.baseline_runs < 1:
        raise ConfigError(f"--baseline-runs must be >= 1, got {s.baseline_runs}")
    if s.compile is not None:
        from .config import COMPILE_MODES

        if s.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile {s.compile!r} is not one of {COMPILE_MODES}")
    if s.dtype:
        parse_dtype(s.dtype)
    s.sources = []
    if s.ppl_tokens:
        for src in s.data if s.data is not None else DEFAULT_DATA:
            try:
                s.sources.append(load_text(src, text_column=s.text_column, split=s.split))
            except DataSourceError:
                if s.data is not None:
                    raise  # asked for: an error; a default that is not here: left out
    atomic.check_output_dir(s.out, force=True)


def ppl_source(s: Study) -> str:
    if s.ppl_model:
        return s.ppl_model
    real = s.model not in presets.SHAPE_PRESETS and not s.random_weights
    return s.model if real else "smollm2-135m"


def study_key(s: Study, dev: torch.device) -> dict:
    """The arguments that decide every row's numbers (the resume check compares them)."""
    return {"model": model_identity(s.model, s.revision, s.random_weights, s.seed),
            "ppl_model": model_identity(ppl_source(s), s.revision if ppl_source(s) == s.model
                                        else None, False, 0) if s.sources else None,
            "device": device_class(dev), "dtype": s.dtype, "compile": s.compile,
            "shape": [s.prompt_len, s.new_tokens, s.warmup_tokens],
            "data": [t.describe()["sha256"] for t in s.sources], "names": [t.name for t in
                                                                          s.sources],
            "ppl_tokens": s.ppl_tokens, "seed": s.seed}


# ---------------------------------------------------------------- measuring one row
class Context:
    """Loaded once per study: the device, the PPL model's base copy and the tokens."""

    def __init__(self, s: Study, log):
        self.s, self.log = s, log
        self.dev = resolve_device(s.device)
        self.same_model = ppl_source(s) == s.model
        self._ppl_base = self._hf = None
        self._tokens: dict[str, list[int]] = {}

    def dtype(self, row_dtype: str = "bfloat16") -> torch.dtype:
        if self.s.dtype:
            return parse_dtype(self.s.dtype)
        return parse_dtype(row_dtype) if self.dev.type == "cuda" else torch.float32

    def speed_model(self, dtype):
        s = self.s
        return load_model(s.model, dtype=dtype, device=str(self.dev),
                          random_weights=s.random_weights, seed=s.seed, revision=s.revision)

    def ppl_base(self, dtype):
        """The PPL model, loaded once and kept on the CPU (out of every row's peak memory)."""
        if self._ppl_base is None or self._ppl_base.model.dtype != dtype:
            s = self.s
            self._ppl_base = load_model(ppl_source(s), dtype=dtype, device="cpu",
                                        revision=s.revision if self.same_model else None)
        return self._ppl_base

    def ppl_model(self, dtype, copy_: bool = False):
        """A copy of the base on the device (on a CPU run the base itself unless ``copy_``)."""
        base = self.ppl_base(dtype)
        if self.dev.type == "cpu" and not copy_:
            return base
        return dataclasses.replace(base, model=copy.deepcopy(base.model).to(self.dev))

    def hf_ppl_model(self, dtype):
        """The PPL model as transformers loads it (the team peers' PPL), read once and kept
        on the CPU; a copy on the device."""
        if self._hf is None or self._hf.dtype != dtype:
            s = self.s
            path = resolve_source(ppl_source(s), s.revision if self.same_model
                                          else None)[0]
            self._hf = peers.hf_from_source(path, dtype, torch.device("cpu"))
        return self._hf if self.dev.type == "cpu" else copy.deepcopy(self._hf).to(self.dev)

    def tokens(self, lm, src) -> list[int]:
        if src.name not in self._tokens:
            self._tokens[src.name] = take_tokens(tokenize(src, lm.tokenizer), self.s.ppl_tokens,
                                                 f"data source {src.name!r}")
        return self._tokens[src.name]


def _free(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _quantize(lm, recipe: str | None) -> list[str]:
    """Apply the row's weight recipe; a checkpoint quantized already is kept as it is."""
    if not recipe:
        return []
    if lm.quant is not None:
        return [f"{lm.source} is quantized already ({lm.quant.name}): {recipe} not applied"]
    from .eval.calibration import calibration_for
    from .quant import QuantConfig, quantize_model, set_backend

    qc = QuantConfig.parse(recipe)
    quantize_model(lm.model, qc, calibration=calibration_for(lm, qc))
    set_backend(lm.model, "auto")
    return []


def _sized(policy, need: int):
    """A dense cache grown to the shape (the registry sizes it for its own runs)."""
    if policy.max_tokens is not None and policy.max_tokens < need:
        return dataclasses.replace(policy, max_len=need)
    return policy


def measure_speed(ctx: Context, name: str) -> dict:
    s, dev = ctx.s, ctx.dev
    if name.startswith(PEER):
        return measure_peer_speed(ctx, name[len(PEER):])
    cfg = registry.get(name)
    lm = ctx.speed_model(ctx.dtype(cfg.dtype))
    notes = _quantize(lm, cfg.speed_quant)
    mode = s.compile or cfg.compile.mode
    if mode == "graphs" and dev.type != "cuda":
        mode = "default"
        notes.append("graphs needs CUDA: compiled without the graph (default)")
    policy = _sized(cfg.speed_cache, s.prompt_len + s.new_tokens)
    dec, step, compile_s = tpot.build_and_compile(lm, policy, mode, kernels=cfg.compile.kernels)
    prompt = tpot.random_prompt(s.prompt_len, lm.spec.vocab_size, s.seed, dev)
    run = tpot.measure(step, dec, prompt=prompt, decode_len=s.new_tokens,
                       warmup_tokens=s.warmup_tokens, compile_s=compile_s).to_dict()
    run["notes"] += notes
    run["dtype"] = str(lm.model.dtype).removeprefix("torch.")
    del lm, dec, step
    _free(dev)
    return run


def measure_peer_speed(ctx: Context, peer: str) -> dict:
    s, dev = ctx.s, ctx.dev
    dtype = ctx.dtype()
    real = s.model not in presets.SHAPE_PRESETS and not s.random_weights
    if real:
        model = peers.hf_from_source(resolve_source(s.model, s.revision)[0], dtype, dev)
    else:
        spec = (presets.SHAPE_PRESETS[s.model]() if s.model in presets.SHAPE_PRESETS else
                load_model(s.model, revision=s.revision, random_weights=True).spec)
        model = peers.hf_model(spec, dtype, dev, seed=s.seed)
    prompt = tpot.random_prompt(s.prompt_len, model.config.vocab_size, s.seed, dev)
    out = peers.run_peer(peer, model, prompt, s.new_tokens, s.warmup_tokens,
                         streaming=(s.peer_sink, s.peer_window), lazy_every=s.peer_lazy_every)
    out["dtype"] = str(dtype).removeprefix("torch.")
    del model
    _free(dev)
    return out


def ppl_through(model, ids: list[int], policy, method: str = "auto") -> dict:
    """PPL of ``ids`` through ``policy``: ``eval.ppl``'s exact parallel evaluator where it
    has a mode of that name, else (or with ``method="decoder"``) token by token through the
    decoder, so a policy that eval.ppl does not know yet still works."""
    import torch.nn.functional as F

    from .engine import Decoder
    from .eval.ppl import EvalSpec, evaluate

    names = {f.name for f in dataclasses.fields(EvalSpec)}
    opts = {k: v for k, v in policy.to_dict().items() if k in names and k != "mode"}
    try:
        spec = EvalSpec(mode=policy.policy, **(opts | {"sink": policy.sink}))
    except (ConfigError, TypeError):
        spec = None
    spec = None if method == "decoder" else spec
    t0 = time.perf_counter()
    if spec is not None:
        r = evaluate(model, ids, spec)
        return {"ppl": r.ppl, "tokens": r.n, "method": f"{spec.method} ({spec.label})",
                "seconds": r.seconds}
    x = torch.as_tensor(ids, device=model.device)
    dec = Decoder.build(model, _sized(policy, x.numel()))
    with torch.no_grad():
        nll = torch.stack([F.cross_entropy(dec.step(x[t:t + 1]).float()[None], x[t + 1:t + 2])
                           for t in range(x.numel() - 1)])
    return {"ppl": math.exp(float(nll.double().mean())), "tokens": x.numel() - 1,
            "method": f"token ({policy.policy})", "seconds": time.perf_counter() - t0}


def measure_ppl(ctx: Context, name: str) -> dict:
    s = ctx.s
    if not ctx.s.sources:
        return {}
    out = {}
    if name.startswith(PEER):
        peer = name[len(PEER):]
        if not peer.startswith("team-streaming"):
            return {"note": "speed only: perplexity is measured for the team-streaming peers"}
        base = ctx.ppl_base(ctx.dtype())  # its tokenizer and dtype
        stream = registry.get("bf16-stream-eager").ppl_cache
        S, W = (s.peer_sink, s.peer_window) if ctx.same_model else (stream.sink, stream.window)
        R = s.peer_lazy_every if peer.endswith("-lazy") else 1
        hf = ctx.hf_ppl_model(base.model.dtype)
        for src in s.sources:
            ids = torch.tensor(ctx.tokens(base, src))
            t0 = time.perf_counter()
            nll = peers_team.team_nll(hf, ids, sink=S, window=W, lazy_every=R)
            out[src.name] = {"ppl": math.exp(float(nll.mean())), "tokens": len(nll),
                             "method": f"token (team pos-shift {S}+{W}, R={R})",
                             "seconds": time.perf_counter() - t0}
        del hf
        return out
    cfg = registry.get(name)
    lm = ctx.ppl_model(ctx.dtype(cfg.dtype), copy_=bool(cfg.quant))
    _quantize(lm, cfg.quant)
    policy = cfg.speed_cache if ctx.same_model else cfg.ppl_cache
    for src in s.sources:
        out[src.name] = ppl_through(lm.model, ctx.tokens(lm, src), policy)
    del lm
    _free(ctx.dev)
    return out


def measure_row(ctx: Context, name: str, speed_runs: int = 1) -> dict:
    """One row: speed ``speed_runs`` times (their mean is the row's figure) and PPL once."""
    runs = [measure_speed(ctx, name) for _ in range(speed_runs)]
    speed = runs[0] if speed_runs == 1 else mean_runs(runs)
    return {"speed": speed, "ppl": measure_ppl(ctx, name)}


def mean_runs(runs: list[dict]) -> dict:
    """The mean of N speed runs (TPOT medians, TTFT, total; the largest peak memory)."""
    out = dict(runs[0])
    out["tpot_ms"] = dict(runs[0]["tpot_ms"], median=sum(r["tpot_ms"]["median"] for r in runs)
                          / len(runs), runs=[r["tpot_ms"]["median"] for r in runs])
    for k in ("ttft_ms", "total_ms"):
        out[k] = sum(r[k] for r in runs) / len(runs)
    peaks = [r.get("peak_mem_gb") for r in runs if r.get("peak_mem_gb") is not None]
    out["peak_mem_gb"] = max(peaks) if peaks else None
    out["mean_of"] = len(runs)
    return out


# ---------------------------------------------------------------- baselines
def baseline_path(s: Study, key: dict, name: str) -> Path:
    store = s.baseline_store or weights._cache_dir() / "study-baselines"
    return Path(store) / f"{safe_name(name)}-{_sha(key | {'row': _row_def(s, name)})[:16]}.json"


def baseline_reusable(rec: dict, runs: int, max_age_days: float | None,
                      now: float | None = None) -> str | None:
    """None if the stored baseline ``rec`` can stand for a new one, else why not."""
    if rec.get("code_hash") != timing_code_hash():
        return "the code that affects timing changed since it was measured"
    if rec.get("versions") != versions():
        return f"versions changed ({rec.get('versions')} -> {versions()})"
    if rec.get("runs", 0) < runs:
        return f"it is the mean of {rec.get('runs')} runs, {runs} asked for"
    age = ((now or time.time()) - rec.get("created", 0)) / 86400
    if max_age_days is not None and age > max_age_days:
        return f"it is {age:.1f} days old (--baseline-max-age {max_age_days})"
    return None


def get_baseline(ctx: Context, key: dict) -> dict:
    s, log = ctx.s, ctx.log
    path = baseline_path(s, key, s.baseline)
    if path.is_file() and not s.refresh_baseline:
        rec = json.loads(path.read_text())
        why = baseline_reusable(rec, s.baseline_runs, s.baseline_max_age_days)
        if why is None:
            log(f"baseline {s.baseline}: reused {path} (mean of {rec['runs']}, measured "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(rec['created']))})")
            return rec | {"reused": True}
        log(f"baseline {s.baseline}: measuring again: {why}")
    log(f"baseline {s.baseline}: measuring (mean of {s.baseline_runs} runs)")
    row = measure_row(ctx, s.baseline, s.baseline_runs)
    rec = {"kind": "fastdecode.study.baseline", "name": s.baseline, "key": key,
           "row": _row_def(s, s.baseline), "runs": s.baseline_runs, "created": time.time(),
           "code_hash": timing_code_hash(), "versions": versions(),
           "env": tpot.env_info(ctx.dev), **row}
    atomic.write_json(path, rec, "study baseline", default=str)
    log(f"baseline {s.baseline}: stored {path}")
    return rec | {"reused": False}


# ---------------------------------------------------------------- the study
def summary(row: dict) -> dict:
    sp = row.get("speed", {})
    return {"tpot_ms": sp.get("tpot_ms", {}).get("median"), "ttft_ms": sp.get("ttft_ms"),
            "total_ms": sp.get("total_ms"), "peak_mem_gb": sp.get("peak_mem_gb"),
            "ppl": {k: v["ppl"] for k, v in row.get("ppl", {}).items() if isinstance(v, dict)}}


def _ratios(row: dict, base: dict | None) -> dict:
    if not base or row.get("error") or base.get("error"):
        return {}
    a, b = summary(row), summary(base)
    out = {}
    if a["tpot_ms"] and b["tpot_ms"]:
        out["speedup"] = b["tpot_ms"] / a["tpot_ms"]
    if a["total_ms"] and b["total_ms"]:
        out["total_speedup"] = b["total_ms"] / a["total_ms"]
    common = [k for k in a["ppl"] if k in b["ppl"]]
    if common:
        out["ppl_ratio"] = {k: a["ppl"][k] / b["ppl"][k] for k in common}
    return out


def run(s: Study, log=print) -> dict:
    """Measure every row not recorded yet, then write the table and the plot."""
    check(s)
    ctx = Context(s, log)
    key = study_key(s, ctx.dev)
    records = Path(s.out) / "records"
    manifest = Path(s.out) / "study.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        diff = [k for k in key if old.get("key", {}).get(k) != key[k]]
        if diff:
            raise ConfigError(f"{s.out} holds a study with other arguments ({', '.join(diff)} "
                              "differ); give another --out to start a new one")
        listed = old["configs"] + [c for c in s.configs if c not in old["configs"]]
    else:
        listed = list(s.configs)
    records.mkdir(parents=True, exist_ok=True)
    atomic.write_json(manifest, {"kind": "fastdecode.study", "key": key, "configs": listed},
                      "study manifest", default=str)
    skey = _sha(key)
    base = get_baseline(ctx, key) if s.baseline else None
    n, done_here, t_start = len(s.configs), 0, time.perf_counter()
    for i, name in enumerate(s.configs, 1):
        try:
            done_here += _one_row(ctx, name, i, n, records, skey, key, base, done_here, t_start)
        except KeyboardInterrupt:
            log(f"[{i}/{n}] {name}: interrupted; the rows recorded so far are kept: run the "
                "same command again to resume")
            raise
    return _finish(s, listed, records, skey, key, base, log)


def _one_row(ctx, name, i, n, records, skey, key, base, done_here, t_start) -> int:
    """Measure and record row ``i`` of ``n`` unless it is recorded; 1 if it was measured."""
    s, log = ctx.s, ctx.log
    path = records / f"{safe_name(name)}.json"
    if _finished(records, name, skey):
        log(f"[{i}/{n}] {name}: recorded earlier ({path}), skipped")
        return 0
    log(f"[{i}/{n}] {name}: measuring")
    t0 = time.perf_counter()
    rec = {"kind": RECORD_KIND, "version": 1, "name": name, "study_key": skey,
           "row": _row_def(s, name), "code_hash": timing_code_hash()}
    if base is not None and name == s.baseline:
        rec.update(speed=base["speed"], ppl=base["ppl"], from_baseline=str(
            baseline_path(s, key, name)))
    else:
        try:
            rec.update(measure_row(ctx, name))
        except peers.PeerUnavailable as e:
            rec["skipped"] = str(e)
        except (FastdecodeError, RuntimeError, ValueError, AssertionError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    rec.update(env=tpot.env_info(ctx.dev), seconds=time.perf_counter() - t0,
               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic.write_json(path, rec, "study record", default=str)
    left = sum(1 for c in s.configs[i:] if not _finished(records, c, skey))
    eta = (time.perf_counter() - t_start) / (done_here + 1) * left
    log(f"[{i}/{n}] {name}: {_line(rec)}; {rec['seconds']:.0f} s; "
        f"{left} left, ETA {eta / 60:.1f} min")
    return 1


def _finish(s: Study, listed, records, skey, key, base, log) -> dict:
    rows = {c: _read(records / f"{safe_name(c)}.json") for c in listed}
    rows = {c: r for c, r in rows.items() if r and r.get("study_key") == skey}
    table = markdown_table(rows, base, s)
    atomic.write_text(Path(s.out) / "study.md", table, "study table")
    plot = write_plot(rows, base, Path(s.out) / "tpot_ppl.png", key)
    log(table)
    log(f"table: {Path(s.out) / 'study.md'}" + (f"; plot: {plot}" if plot else ""))
    return {"rows": rows, "baseline": base, "table": table, "plot": plot}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(records: Path, name: str, skey: str) -> bool:
    r = _read(records / f"{safe_name(name)}.json")
    return bool(r and r.get("study_key") == skey and "error" not in r)


def _line(rec: dict) -> str:
    if "error" in rec or "skipped" in rec:
        return ("FAILED: " + rec["error"][:300]) if "error" in rec else rec["skipped"]
    m = summary(rec)
    ppl = ", ".join(f"PPL {k} {v:.3f}" for k, v in m["ppl"].items())
    return (f"TPOT {m['tpot_ms']:.3f} ms, TTFT {m['ttft_ms']:.1f} ms, total "
            f"{m['total_ms'] / 1e3:.2f} s" + (f", {ppl}" if ppl else ""))


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown_table(rows: dict, base: dict | None, s: Study) -> str:
    srcs = [t.name for t in s.sources]
    head = (["configuration", "TPOT ms", "speed-up", "TTFT ms", "total s", "peak GB"]
            + [f"PPL {k}" for k in srcs] + (["PPL / baseline"] if base else []))
    lines = [f"Study of {s.model}: prompt {s.prompt_len}, {s.new_tokens} new tokens "
             f"({s.warmup_tokens} warm-up discarded); PPL over {s.ppl_tokens} tokens.", ""]
    if base:
        lines += [f"Baseline {s.baseline}: mean of {base['runs']} runs"
                  f"{' (stored, reused)' if base.get('reused') else ''}; speed-up = its TPOT "
                  "/ the row's.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ([s.baseline] if base else []) + [c for c in rows if c != s.baseline]
    for name in order:
        r = rows.get(name) or (base if name == s.baseline else None)
        if r is None:
            continue
        label = name + (" (baseline)" if name == s.baseline else "")
        if "error" in r or "skipped" in r:
            lines.append(f"| {label} | " + (("FAILED: " + r["error"][:80]) if "error" in r
                                            else "skipped: " + r["skipped"][:80])
                         + " |" * (len(head) - 1))
            continue
        m, q = summary(r), _ratios(r, base)
        cells = [label, _fmt(m["tpot_ms"], ".3f"), _fmt(q.get("speedup"), ".2f") + "x"
                 if q.get("speedup") else "—", _fmt(m["ttft_ms"], ".1f"),
                 _fmt(m["total_ms"] and m["total_ms"] / 1e3, ".2f"),
                 _fmt(m["peak_mem_gb"], ".2f")]
        cells += [_fmt(m["ppl"].get(k), ".3f") for k in srcs]
        if base:
            pr = q.get("ppl_ratio", {})
            cells.append(" / ".join(f"{pr[k]:.3f}" for k in srcs if k in pr) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(rows: dict, base: dict | None, out: Path, key: dict) -> Path | None:
    """TPOT against PPL (the first source, relative to the baseline or the first row)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from .bench.plots import plot_pareto

    ok = {c: summary(r) for c, r in rows.items() if "speed" in r and summary(r)["tpot_ms"]}
    ref = summary(base) if base else next((m for m in ok.values() if m["ppl"]), None)
    if not ref or not ref["ppl"]:
        return None
    src = next(iter(ref["ppl"]))
    results = {c: {"tpot_ms": m["tpot_ms"], "ppl_ratio": m["ppl"][src] / ref["ppl"][src]}
               for c, m in ok.items() if src in m["ppl"]}
    from .eval.record import git_info

    run_ = Run(out, time.strftime("%Y-%m-%dT%H:%M:%S"), git_info().get("commit", "")[:10],
               key["device"], results)
    return plot_pareto(run_, out, ylabel=f"PPL on {src} / the baseline's")


__all__ = ["Study", "run", "check", "timing_code_hash", "baseline_reusable", "ppl_through",
           "markdown_table", "model_identity", "DEFAULT_DATA"]
