"""`fastdecode bench`: decode speed (TPOT at steady state) of one configuration, with peers,
variants, sweeps and a profile in the same run; writes one JSON record (docs/cli.md)."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

from ..config import COMPILE_MODES
from ..errors import ConfigError
from .common import add_cache_args, add_model_args, cache_config, load
from .outputs import check_bench_outputs


def _csv(kind):
    def parse(text: str):
        if not text:
            return []
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"cannot parse {text!r} as a comma-separated list") from None
    return parse


def add_parser(sub) -> None:
    from ..compile import GEMV_MODES, KERNEL_MODES

    p = sub.add_parser("bench", help="time decoding (TPOT, prefill, memory, bandwidth) with "
                                     "peers, sweeps and a profile; write a JSON record")
    add_model_args(p)
    add_cache_args(p)
    g = p.add_argument_group("decode path")
    g.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="none (eager) | default (compiled kernels, launched one by one) | "
                        "graphs (the step captured as one CUDA graph; CUDA only). Default: "
                        "graphs on CUDA, default on the CPU")
    g.add_argument("--kernels", choices=KERNEL_MODES, default="auto",
                   help="whose kernels make the step: fused (our Triton step) or inductor "
                        "(torch.compile of the eager step; --gemv applies); auto = "
                        "fused on CUDA, inductor on the CPU")
    g.add_argument("--gemv", choices=GEMV_MODES, default="auto",
                   help="with --kernels inductor, one-row matmuls: inductor reductions "
                        "(reduction) or cuBLAS (extern); auto = reduction on CUDA")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk length (default: 16384 with the flash prefill kernel, "
                        "512 with the reference attention)")
    g.add_argument("--quant", default=None, metavar="RECIPE",
                   help="weight-only quantization applied after loading, e.g. int8, "
                        "int4-mlp-g128, int4-g128, int4-mlp-g128-gptq (see fastdecode "
                        "quantize)")
    g = p.add_argument_group("lengths")
    g.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens (random ids); default: sink + window (cache full)")
    from ..bench.tpot import DECODE_LEN, WARMUP_TOKENS  # the perf suite's lengths too

    g.add_argument("--decode-len", type=int, default=None,
                   help=f"decode steps timed (default {DECODE_LEN}; a --preset's own)")
    g.add_argument("--warmup-tokens", type=int, default=WARMUP_TOKENS,
                   help="first decode steps discarded from the statistics")
    g = p.add_argument_group("in the same run")
    g.add_argument("--peers", type=_csv(str), default=[],
                   help="comma list of hf-eager, hf-static-compile, hf-torchao-int8, "
                        "hf-torchao-int4-mlp-g128 (need torchao), team-streaming, "
                        "team-streaming-lazy (the cache's sink and window; lazy every 32)")
    g.add_argument("--peer-prompt-len", type=int, default=None,
                   help="prompt for the peers (dense caches); default: the window, so their "
                        "KV length matches ours at steady state")
    g.add_argument("--peer-decode-len", type=int, default=64)
    g.add_argument("--peer-warmup-tokens", type=int, default=8)
    g.add_argument("--peer-total", action="store_true",
                   help="also run the peers on our shape (--prompt-len, --decode-len) for "
                        "time to first token and total time (hf-static-compile if --peers "
                        "is empty)")
    g.add_argument("--variants", type=_csv(str), default=[],
                   help="more runs of our engine on the same shapes: "
                        "MODE[:KERNELS[:GEMV]], e.g. "
                        "none,default,graphs:inductor,graphs:inductor:extern")
    g.add_argument("--check", type=int, default=0, metavar="N",
                   help="compare the main path's logits with the eager path over N steps")
    g.add_argument("--sweep-windows", type=_csv(int), default=[],
                   help="comma list of windows to time too (each compiled anew)")
    g.add_argument("--sweep-prompts", type=_csv(int), default=[],
                   help="comma list of prompt lengths to time too (prefill and TPOT)")
    g.add_argument("--sweep-decode-len", type=int, default=64)
    g.add_argument("--sweep-warmup-tokens", type=int, default=8)
    g.add_argument("--profile", default=None, metavar="TRACE",
                   help="export a Chrome trace (.json or .json.gz) of a few decode steps and "
                        "put a kernel summary in the record")
    g.add_argument("--profile-steps", type=int, default=5)
    g = p.add_argument_group("targets (recorded with the miss, if any)")
    g.add_argument("--target-tpot-ms", type=float, default=None)
    g.add_argument("--target-vs-static", type=float, default=None,
                   help="minimum speed-up over hf-static-compile")
    g.add_argument("--target-vs-eager", type=float, default=None,
                   help="minimum speed-up over hf-eager")
    g.add_argument("--target-total-vs-static", type=float, default=None,
                   help="maximum ratio of our total time (prefill + decode) to "
                        "hf-static-compile's on the same shape, e.g. 0.5 (implies "
                        "--peer-total)")
    from ..bench.team import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="run a preset table of several configurations instead of one (their "
                        "caches and weights; the cache options above are ignored): h2o-team "
                        "= full attention, int8 full attention, int8 + H2O 252/252, prompt "
                        "500, decode 1,000 unless --prompt-len / --decode-len say otherwise")
    p.add_argument("--json", default=None, help="write the record here")
    p.set_defaults(run=run)


def _lengths(what: str, decode_len: int, warmup: int, prompts=()) -> None:
    for p in prompts:
        if p is not None and p < 1:
            raise ConfigError(f"{what}: prompt length must be >= 1, got {p}")
    if decode_len < 2:
        raise ConfigError(f"{what}: decode length must be >= 2, got {decode_len}")
    if not 0 <= warmup < decode_len:
        raise ConfigError(f"{what}: warm-up tokens must be in [0, {decode_len}), got {warmup}")


def check_run_args(args) -> None:
    """Everything the later parts of a run need, checked before the model is loaded."""
    from ..bench.peers import PEERS

    for peer in args.peers:
        if peer not in PEERS:
            raise ConfigError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {args.chunk_size}")
    if args.check < 0:
        raise ConfigError(f"--check must be >= 0 (steps compared), got {args.check}")
    if args.profile and args.profile_steps < 1:
        raise ConfigError(f"--profile-steps must be >= 1, got {args.profile_steps}")
    if args.peers:
        _lengths("--peer-*", args.peer_decode_len, args.peer_warmup_tokens,
                 [args.peer_prompt_len])
    if args.sweep_prompts or args.sweep_windows:
        _lengths("--sweep-*", args.sweep_decode_len, args.sweep_warmup_tokens,
                 args.sweep_prompts)
    for w in args.sweep_windows:
        if w < 1:
            raise ConfigError(f"--sweep-windows: window must be >= 1, got {w}")


def _run_line(name: str, r: dict) -> str:
    t = r.get("tpot_ms", {})
    if "error" in r:
        return f"{name:34s} FAILED: {r['error'][:120]}"
    if "skipped" in r:
        return f"{name:34s} skipped: {r['skipped'][:120]}"
    bw = r.get("achieved_gbps")
    return (f"{name:34s} {t.get('median', float('nan')):8.3f} {t.get('mean', float('nan')):8.3f}"
            f" {t.get('p90', float('nan')):8.3f} {r.get('prefill_ms', float('nan')):9.1f}"
            f" {(bw or float('nan')):8.0f} {r.get('compile_s', 0.0):7.1f}"
            f" {r.get('total_ms', float('nan')):9.1f}")


def _record(args, lm, **config) -> dict:
    """The record's head: the command, the configuration and the environment."""
    from ..bench import tpot

    return {"kind": "fastdecode.bench", "version": 1,
            "command": "fastdecode " + " ".join(sys.argv[1:]) if sys.argv else "",
            "config": {"model": args.model, "source": lm.source,
                       "dtype": str(lm.model.dtype).removeprefix("torch."), **config},
            "env": tpot.env_info(lm.model.device)}


def run_preset(args, log) -> int:
    """``--preset``: its rows measured one after another in this process, the table
    printed, one record written (``preset``: the rows by label)."""
    import torch

    from ..bench import team, tpot

    prompt_len, decode_len, _ = team.PRESETS[args.preset]
    prompt_len = args.prompt_len if args.prompt_len is not None else prompt_len
    decode_len = args.decode_len if args.decode_len is not None else decode_len
    tpot.check_lengths(prompt_len, decode_len, args.warmup_tokens)
    check_bench_outputs(args)
    lm = load(args)
    mode = args.compile or ("graphs" if lm.model.device.type == "cuda" else "none")
    record = _record(args, lm, compile=mode, kernels=args.kernels, prompt_len=prompt_len,
                     decode_len=decode_len, warmup_tokens=args.warmup_tokens, seed=args.seed,
                     batch=1)
    record["preset"] = args.preset
    rows = team.preset_rows(args.preset, prompt_len, decode_len, record["config"]["dtype"])
    log(f"preset {args.preset}: {len(rows)} modes, prompt {prompt_len}, decode {decode_len}, "
        f"compile {mode} on {record['env'].get('gpu') or record['env'].get('cpu')} "
        f"(torch {torch.__version__})")
    record["rows"] = team.run_rows(lm, rows, mode=mode, kernels=args.kernels,
                                   prompt_len=prompt_len, decode_len=decode_len,
                                   warmup_tokens=args.warmup_tokens, seed=args.seed, log=log)
    if args.json:
        tpot.write_json(args.json, record)
    log("")
    for line in team.table(record["rows"], base=rows[0][0]):
        log(line)
    return 0 if all("error" not in r for r in record["rows"].values()) else 1


def decode_len(args) -> int:
    """The steps timed: the perf suite's (tpot.DECODE_LEN) unless given (a preset has its own)."""
    from ..bench.tpot import DECODE_LEN

    return DECODE_LEN if args.decode_len is None else args.decode_len


def run(args) -> int:
    import torch

    from ..bench import tpot
    from ..bench.peers import run_peers
    from ..compile import resolve_gemv, resolve_kernels
    from ..engine import Decoder

    log = functools.partial(print, flush=True)
    if args.preset:
        return run_preset(args, log)
    args.decode_len = decode_len(args)
    cfg = cache_config(args)
    bounded = cfg.max_tokens is None
    prompt_len = args.prompt_len if args.prompt_len is not None else \
        tpot.default_prompt_len(cfg)
    tpot.check_lengths(prompt_len, args.decode_len, args.warmup_tokens)
    if not bounded and prompt_len + args.decode_len > cfg.max_tokens:
        raise ConfigError(f"the dense cache holds {cfg.max_tokens} tokens; prompt + decode "
                          f"need {prompt_len + args.decode_len}")
    if args.sweep_windows and not bounded:
        raise ConfigError("--sweep-windows needs a bounded cache (streaming or window)")
    from ..compile import GEMV_MODES, KERNEL_MODES

    variants = []
    for v in args.variants:
        mode, kern, gemv = (v.split(":") + ["", ""])[:3]
        if mode not in COMPILE_MODES or (kern or "auto") not in KERNEL_MODES \
                or (gemv or "auto") not in GEMV_MODES:
            raise ConfigError(f"variant {v!r}: expected MODE[:KERNELS[:GEMV]] with "
                              f"MODE in {COMPILE_MODES}, KERNELS in {KERNEL_MODES}, GEMV in "
                              f"{GEMV_MODES}")
        variants.append((mode, kern or "auto", gemv or "auto"))
    check_run_args(args)
    check_bench_outputs(args)  # before the (slow) load and the timing
    if args.quant:
        from ..quant import QuantConfig

        qcfg = QuantConfig.parse(args.quant)

    lm = load(args)
    dev = lm.model.device
    if args.quant:
        from ..eval.calibration import calibration_for
        from ..quant import quantize_model, set_backend

        quantize_model(lm.model, qcfg, calibration=calibration_for(lm, qcfg),
                       progress=True)
        set_backend(lm.model, "auto")
    mode = args.compile or ("graphs" if dev.type == "cuda" else "default")
    record = _record(args, lm, cache=cfg.to_dict(), compile=mode, kernels=args.kernels,
                     quant=qcfg.name if args.quant else None,
                     gemv=resolve_gemv(args.gemv, dev) if mode != "none" else "eager",
                     prompt_len=prompt_len, decode_len=args.decode_len,
                     warmup_tokens=args.warmup_tokens, chunk_size=args.chunk_size,
                     seed=args.seed)

    def save():
        if args.json:
            tpot.write_json(args.json, record)

    log(f"device: {record['env'].get('gpu') or record['env'].get('cpu')}  torch "
        f"{torch.__version__}  model {lm.source} {record['config']['dtype']}")
    bw = tpot.device_bandwidth(dev)
    record["device_bandwidth"] = bw
    if bw["copy_gbps"]:
        log(f"device copy bandwidth {bw['copy_gbps']:.0f} GB/s (read+write), "
            f"read bandwidth {bw['read_gbps']:.0f} GB/s")
    save()

    prompt = tpot.random_prompt(prompt_len, lm.spec.vocab_size, args.seed, dev)
    t0 = time.perf_counter()
    # The perf suite's timing (tests/perf): the same function, lengths and statistic.
    dec, step, main = tpot.time_config(
        lm, cfg, mode, gemv=args.gemv, kernels=args.kernels, chunk_size=args.chunk_size,
        prompt_len=prompt_len, decode_len=args.decode_len, warmup_tokens=args.warmup_tokens,
        seed=args.seed, copy_gbps=bw["copy_gbps"])
    main, compile_s = main.to_dict(), main.compile_s
    record["config"].update(kernels=step.kernels, gemv=step.gemv, attention=step.attention)
    log(f"main: compiled ({mode}, kernels={step.kernels}, gemv={step.gemv}, "
        f"attention={step.attention}) in {compile_s:.1f} s")
    b = main["bytes_per_token"]
    if bw["copy_gbps"]:
        main["fraction_of_copy_bw"] = main["efficiency"]  # the name older records use
    record["result"] = main
    log(f"main: TPOT median {main['tpot_ms']['median']:.3f} ms over {main['steady_tokens']} "
        f"steady tokens; TTFT {main['ttft_ms']:.1f} ms, total {main['total_ms']:.1f} ms; "
        f"{b['total'] / 1e9:.2f} GB/token -> {main['achieved_gbps']:.0f} GB/s")
    save()

    def set_targets() -> list:
        out = []
        med = main["tpot_ms"]["median"]
        if args.target_tpot_ms is not None:
            out.append(tpot.target("tpot_ms", med, args.target_tpot_ms, True))
        for flag, peer in ((args.target_vs_static, "hf-static-compile"),
                           (args.target_vs_eager, "hf-eager")):
            if flag is not None:
                ratio = record.get("peers", {}).get(peer, {}).get("ratio_vs_ours")
                out.append(tpot.target(f"speedup_vs_{peer}", ratio, flag, False))
        if args.target_total_vs_static is not None:
            ratio = record.get("peers_total", {}).get("hf-static-compile", {}).get(
                "ours_total_ratio")
            out.append(tpot.target("total_vs_hf-static-compile", ratio,
                                   args.target_total_vs_static, True))
        if out:
            record["targets"] = out
        return out

    set_targets()
    if args.check:
        ref = Decoder.build(lm.model, cfg, chunk_size=args.chunk_size)
        chk_prompt = prompt[: min(prompt_len, 512)]
        record["check"] = tpot.compare_steps(ref, dec, chk_prompt, args.check)
        record["check"].update(reference="eager", compared=f"{mode}/{step.gemv}",
                               dtype=record["config"]["dtype"])
        log(f"check vs eager: {record['check']}")
        del ref
        save()

    if args.profile:
        try:
            dec.reset()
            dec.prefill(prompt)
            dec.cache.check_room(dec.t + args.profile_steps + 4)
            dec.pos_buf.fill_(dec.t)
            record["profile"] = tpot.profile_steps(step.run_one, args.profile_steps,
                                                   args.profile, dev)
            if step.graph is not None:
                dec.pos_buf.fill_(dec.t)
                trace2 = args.profile.replace(".json", "-nograph.json")
                record["profile_nograph"] = tpot.profile_steps(
                    lambda: step.fn(dec.tok_buf, dec.pos_buf), args.profile_steps, trace2, dev)
            pr = record["profile"]
            log(f"profile: {pr['kernels_per_step']:.0f} kernels/step, kernel time "
                f"{pr['kernel_ms_per_step']:.3f} ms of {pr['step_ms']:.3f} ms/step; by category "
                + ", ".join(f"{k} {v:.3f}" for k, v in pr["by_category_ms"].items()))
        except Exception as e:  # noqa: BLE001
            record["profile"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"profile FAILED: {e}")
        save()

    if args.sweep_prompts:
        rows = []
        for P in args.sweep_prompts:
            try:
                if not bounded and P + args.sweep_decode_len > cfg.max_tokens:
                    raise ConfigError(f"prompt {P} does not fit the dense cache")
                pr = tpot.random_prompt(P, lm.spec.vocab_size, args.seed + P, dev)
                r = tpot.measure(step, dec, prompt=pr, decode_len=args.sweep_decode_len,
                                 warmup_tokens=args.sweep_warmup_tokens).to_dict()
                r["notes"].append("the main decoder, reset and prefilled anew")
            except Exception as e:  # noqa: BLE001
                r = {"prompt_len": P, "error": f"{type(e).__name__}: {e}"[:1000]}
            rows.append(r)
            log(_run_line(f"prompt {P}", r))
        record["sweep_prompts"] = rows
        save()

    peers = {}
    team_window = (cfg.sink, getattr(cfg, "window", 2048))  # the team-streaming peers'
    if args.peers:
        window = getattr(cfg, "window", cfg.budget)  # h2o, tova: no window, their budget
        ppl = args.peer_prompt_len or (window if bounded else prompt_len)
        pprompt = tpot.random_prompt(ppl, lm.spec.vocab_size, args.seed, dev)
        peers = run_peers(args.peers, lm.spec, lm.model.dtype, dev, pprompt,
                          args.peer_decode_len, args.peer_warmup_tokens, log=log,
                          streaming=team_window)
        for r in peers.values():
            if "tpot_ms" in r:
                r["ratio_vs_ours"] = r["tpot_ms"]["median"] / main["tpot_ms"]["median"]
        record["peers"] = peers
        set_targets()
        save()

    if args.peer_total or args.target_total_vs_static is not None:
        # The same shape as ours: TTFT is their forward of our prompt, total adds our
        # number of decode steps (their dense cache grows to prompt + decode).
        totals = run_peers(list(args.peers) or ["hf-static-compile"], lm.spec, lm.model.dtype,
                           dev, prompt, args.decode_len,
                           min(args.warmup_tokens, args.decode_len // 2), log=log,
                           streaming=team_window)
        for r in totals.values():
            if "total_ms" in r:
                r["ours_total_ratio"] = main["total_ms"] / r["total_ms"]
                r["ours_ttft_ratio"] = main["ttft_ms"] / r["ttft_ms"]
                log(f"peer {r['peer']} on our shape: TTFT {r['ttft_ms']:.1f} ms, total "
                    f"{r['total_ms']:.1f} ms; ours/theirs total x{r['ours_total_ratio']:.2f}")
        record["peers_total"] = totals
        set_targets()
        save()

    record["variants"] = {}
    for vmode, vkern, vgemv in variants:
        vk = resolve_kernels(vkern, vmode, dec)
        name = ("none" if vmode == "none" else f"{vmode}:fused" if vk == "fused" else
                f"{vmode}:inductor:{resolve_gemv(vgemv, dev)}")
        try:
            same = vk == step.kernels and (vk == "fused" or resolve_gemv(vgemv, dev) == step.gemv)
            if vmode == "default" and mode == "graphs" and same:
                def run_one(step=step, dec=dec):
                    step.fn(dec.tok_buf, dec.pos_buf)
                r = tpot.measure(step, dec, prompt=prompt, decode_len=args.decode_len,
                                 warmup_tokens=args.warmup_tokens, run_one=run_one,
                                 mode="default", gemv=step.gemv,
                                 compile_s=compile_s).to_dict()
                r["notes"].append("the main step's compiled function, run without its graph")
            else:
                vd, vs, vc = tpot.build_and_compile(lm, cfg, vmode, vgemv, args.chunk_size,
                                                    vkern)
                n = args.decode_len if vmode != "none" else min(args.decode_len,
                                                                 args.warmup_tokens + 32)
                r = tpot.measure(vs, vd, prompt=prompt, decode_len=n,
                                 warmup_tokens=min(args.warmup_tokens, n // 2),
                                 compile_s=vc).to_dict()
                del vd, vs
            r["vs_main"] = r["tpot_ms"]["median"] / main["tpot_ms"]["median"]
            record["variants"][name] = r
            log(f"variant {name}: TPOT median {r['tpot_ms']['median']:.3f} ms")
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            record["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"variant {name} FAILED: {e}")
        torch.cuda.empty_cache()  # a no-op where CUDA was never used
        save()

    if args.sweep_windows:
        rows = []
        del dec, step
        torch.cuda.empty_cache()
        for W in args.sweep_windows:
            try:
                wcfg = dataclasses.replace(cfg, window=W)
                wd, ws, wc = tpot.build_and_compile(lm, wcfg, mode, args.gemv, args.chunk_size,
                                                    args.kernels)
                wp = tpot.random_prompt(wcfg.budget, lm.spec.vocab_size, args.seed + W, dev)
                r = tpot.measure(ws, wd, prompt=wp, decode_len=args.sweep_decode_len,
                                 warmup_tokens=args.sweep_warmup_tokens, compile_s=wc).to_dict()
                if bw["copy_gbps"]:
                    r["floor_ms"] = r["bytes_per_token"]["total"] / bw["copy_gbps"] / 1e6
                del wd, ws
            except Exception as e:  # noqa: BLE001
                r = {"window": W, "error": f"{type(e).__name__}: {e}"[:1000]}
            r["window"] = W
            rows.append(r)
            log(_run_line(f"window {W}", r))
            torch.cuda.empty_cache()
            record["sweep_windows"] = rows
            save()

    targets = set_targets()
    if record["config"]["kernels"] == "fused" or any(k.endswith(":fused")
                                                     for k in record["variants"]):
        from ..fused import tune

        record["launches"] = tune.chosen()  # per GEMV shape: launch and source (table)
    save()

    # ---------------------------------------------------------------- table
    log("")
    log(f"{'run':34s} {'median':>8s} {'mean':>8s} {'p90':>8s} {'prefill':>9s} {'GB/s':>8s} "
        f"{'comp_s':>7s} {'total':>9s}   (ms)")
    main_name = (f"ours {mode}:fused" if record["config"]["kernels"] == "fused" else
                 f"ours {mode}:inductor:{record['config']['gemv']}:"
                 f"{record['config']['attention']}")
    log(_run_line(main_name, main))
    for name, r in record.get("variants", {}).items():
        log(_run_line(f"ours {name}", r))
    for name, r in peers.items():
        line = _run_line(name, r)
        if "ratio_vs_ours" in r:
            line += f"   x{r['ratio_vs_ours']:.1f} slower than ours"
        log(line)
    for name, r in record.get("peers_total", {}).items():
        log(_run_line(f"{name} (our shape)", r))
    if bw["copy_gbps"]:
        log(f"floor at copy bandwidth: {main['floor_ms']:.3f} ms/token; achieved "
            f"{main['fraction_of_copy_bw'] * 100:.0f}% of {bw['copy_gbps']:.0f} GB/s")
    for t in targets:
        state = "met" if t["met"] else ("n/a" if t["met"] is None else
                                        f"MISSED by {t['miss_by']:.3g} ({t['miss_by_rel']:.0%})")
        log(f"target {t['name']}: {t['value'] if t['value'] is None else round(t['value'], 3)}"
            f" vs {t['target']}: {state}")
    log(f"total bench time {time.perf_counter() - t0:.0f} s")
    return 0

