#!/usr/bin/env python
"""StreamingLLM's phenomenon on a real model: the item-4 perplexity sweep.

Dense vs window-only vs sliding window with re-computation vs sinks + window (0/1/4/8
sinks at a fixed cache budget of about 1k and 2k tokens) vs lazy eviction (R = 1/16/32/128)
on one long text, with the exact parallel evaluator (``fastdecode.eval``). Writes, under
``--out``: one JSON record + per-token NLL CSV per configuration, ``summary.json``,
``table.md`` and ``ppl_segments.png``. Resumable: a configuration whose record already
matches (model, data, tokens, dtype) is not run again (``--force`` to redo), so the sweep
can be run in pieces (``--configs``).

    python scripts/ppl_sweep.py --device cuda --max-tokens 16384          # the whole sweep
    python scripts/ppl_sweep.py --list                                     # config labels
    python scripts/ppl_sweep.py --configs 'recompute-*' --device cuda      # a piece
    python scripts/ppl_sweep.py --max-tokens 600 --budgets 64,128 \\
        --lazy 4,16 --device cpu --out /tmp/sweep                          # a smoke run

See docs/ppl.md for the definitions and the table this sweep feeds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fastdecode.errors import FastdecodeError

DEFAULT_OUT = "perf/sweeps/ppl-{model}-{data}-{n}"


def parse_ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") \
            from None


def sweep_specs(budgets, sinks, lazy, lazy_sink=4, recompute=True, recompute_sinks=(),
                chunk_size=512, recompute_batch=None):
    """The configurations, in table order. A budget C is the cache size the paper quotes:
    window-only and recompute keep W = C, sinks + window keep S + (C - S)."""
    from fastdecode.eval.ppl import EvalSpec

    kw = dict(chunk_size=chunk_size)
    specs = [EvalSpec(mode="dense", sink=0, **kw)]
    for c in budgets:
        specs.append(EvalSpec(mode="window", sink=0, window=c, **kw))
        if recompute:
            specs.append(EvalSpec(mode="recompute", sink=0, window=c,
                                  recompute_batch=recompute_batch, **kw))
            for s in recompute_sinks:
                specs.append(EvalSpec(mode="recompute", sink=s, window=c - s,
                                      recompute_batch=recompute_batch, **kw))
        for s in sinks:
            if s == 0:
                continue  # streaming with 0 sinks is the window-only row
            specs.append(EvalSpec(mode="streaming", sink=s, window=c - s, **kw))
        for r in lazy:
            if r > 1:
                specs.append(EvalSpec(mode="streaming", sink=lazy_sink, window=c - lazy_sink,
                                      compress_every=r, **kw))
    seen, out = set(), []
    for sp in specs:
        if sp.label not in seen:
            seen.add(sp.label)
            out.append(sp)
    return out


def select(specs, patterns):
    if not patterns:
        return specs
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.label, p) for p in pats)]
    if not chosen:
        raise FastdecodeError(f"--configs {patterns!r} matches none of: "
                              + ", ".join(s.label for s in specs))
    return chosen


def canonical_command(argv) -> str:
    """The command line that makes the whole table: argv without the options that only pick
    which pieces run (--configs, --force, --no-progress)."""
    out, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--configs",):
            skip = True
            continue
        if a.startswith("--configs=") or a in ("--force", "--no-progress"):
            continue
        out.append(a)
    return "python scripts/ppl_sweep.py " + " ".join(shlex.quote(a) for a in out)


def record_matches(rec: dict, want: dict) -> bool:
    cfg = rec.get("config", {})
    return (cfg.get("model") == want["model"] and cfg.get("dtype") == want["dtype"]
            and cfg.get("max_tokens") == want["max_tokens"]
            and rec.get("data", {}).get("source") == want["data"]
            and cfg.get("eval", {}).get("mode") == want["mode"])


def load_per_token(rec: dict, json_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from fastdecode.eval.diagnose import read_per_token

    pt = rec["per_token"]
    p = json_path.parent / pt.get("relative_to_record", pt["path"])
    cols = read_per_token(p)
    return (np.asarray(cols["nll"], dtype=np.float64),
            np.asarray(cols["kv_len"], dtype=np.int64))


def seg_ppl(nll: np.ndarray, lo: int, hi: int) -> float | None:
    part = nll[lo:hi]
    return math.exp(float(part.mean())) if part.size else None


def fmt(v, nd=2):
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def _signed(v):
    return "–" if v is None else f"{v:+.3f}"


def summarize(rows, *, n, segment, trained, command, env, data, model) -> dict:
    return {"command": command, "model": model, "data": data, "tokens_scored": n,
            "trained_context": trained, "segment": segment, "environment": env,
            "configs": rows}


def table_md(summary: dict) -> str:
    n, seg, trained = summary["tokens_scored"], summary["segment"], summary["trained_context"]
    rows = summary["configs"]
    lines = [
        f"Model `{summary['model']}`, text `{summary['data']['source']}`, {n} tokens scored, "
        f"{summary['environment'].get('device')} "
        f"({summary['environment'].get('gpu') or summary['environment'].get('cpu')}), "
        f"torch {summary['environment'].get('torch')}, dtype {rows[0]['dtype'] if rows else ''}.",
        "",
        f"| config | S | W | R | keys seen (max) | PPL | PPL ≤{trained} | PPL >{trained} "
        f"| worst {seg}-seg | Δnll vs dense ≤{trained} | first eviction: peak / mean excess "
        "(nats) / width | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        sp = r.get("first_event")
        spike = (f"{sp['peak']:+.2f} / {sp['area'] / sp['horizon']:+.3f} / {sp['width']}"
                 f"{'+' if sp['persistent'] else ''}"
                 if sp and sp.get("peak") is not None and sp["horizon"] else "–")
        lines.append(
            f"| {r['label']} | {r['sink']} | {r['window'] if r['mode'] != 'dense' else '–'} "
            f"| {r['compress_every']} | {r['max_kv_len']} | {fmt(r['ppl'])} "
            f"| {fmt(r['ppl_within'])} | {fmt(r['ppl_beyond'])} | {fmt(r['worst_segment'])} "
            f"| {_signed(r['mean_excess_nll_vs_dense'])} | {spike} "
            f"| {fmt(r['tokens_per_s'], 0)} |")
    lines += [
        "",
        f"keys seen: the most keys one prediction attends to. PPL ≤{trained} / >{trained}: "
        "over the tokens inside / past the model's trained context. Δnll vs dense: mean "
        "per-token NLL minus dense attention's on the same tokens, inside the trained "
        "context. First eviction: from the first step that loses a token, the NLL minus "
        "dense's over the diagnosis horizon: the peak of its running mean, its mean over the "
        "whole horizon, and the width of the peak at half height (tokens; '+' = still above "
        "at the end of the horizon); see fastdecode.eval.diagnose.",
    ]
    nseg = max((len(r["segments"]) for r in rows), default=0)
    def tok(v):
        return f"{v // 1024}k" if v and v % 1024 == 0 else str(v)
    head = [f"{tok(i * seg)}–{tok(min((i + 1) * seg, n))}" for i in range(nseg)]
    lines += ["", f"PPL per {seg}-token segment:", "",
              "| config | " + " | ".join(head) + " |",
              "|---|" + "---:|" * nseg]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(fmt(v) for v in r["segments"]) + " |")
    lines += ["", "Command: `" + summary["command"] + "`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--name", default=None,
                   help="model name shown in the table and plot (default: --model)")
    p.add_argument("--data", default="pg19-10146")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens scored")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--budgets", type=parse_ints, default=[1024, 2048],
                   help="cache budgets C (window-only W=C; sinks S + (C-S))")
    p.add_argument("--sinks", type=parse_ints, default=[0, 1, 4, 8])
    p.add_argument("--lazy", type=parse_ints, default=[1, 16, 32, 128],
                   help="compress_every values for the lazy rows (with --lazy-sink sinks)")
    p.add_argument("--lazy-sink", type=int, default=4)
    p.add_argument("--no-recompute", action="store_true", help="skip the recompute rows")
    p.add_argument("--recompute-sinks", type=parse_ints, default=[],
                   help="also recompute with these sink counts (S + (C-S), re-encoded)")
    p.add_argument("--recompute-batch", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--configs", default=None,
                   help="comma-separated labels or globs to run (default: all)")
    p.add_argument("--list", action="store_true", help="print the configuration labels")
    p.add_argument("--force", action="store_true", help="re-run configs already recorded")
    p.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--segment", type=int, default=2048, help="segment of the tables")
    p.add_argument("--plot-segment", type=int, default=1024, help="segment of the plot")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--parity", type=int, default=0, metavar="N",
                   help="instead of the sweep: check the parallel evaluator against token-by-"
                        "token feeding on the first N tokens (streaming 4+1020, window-512 "
                        "R32, dense, recompute-128; shorter for the slower ones); writes "
                        "parity.json")
    p.add_argument("--before", type=int, default=256, help="diagnosis: baseline steps")
    p.add_argument("--after", type=int, default=512, help="diagnosis: horizon after an event")
    p.add_argument("--smooth", type=int, default=32, help="diagnosis: smoothing width")
    args = p.parse_args(argv)

    specs = sweep_specs(args.budgets, args.sinks, args.lazy, args.lazy_sink,
                        not args.no_recompute, args.recompute_sinks, args.chunk_size,
                        args.recompute_batch)
    if args.list:
        print("\n".join(s.label for s in specs))
        return 0
    try:
        return run(args, specs)
    except FastdecodeError as e:
        print(f"ppl_sweep: error: {e}", file=sys.stderr)
        return 2


def run(args, specs) -> int:
    import torch

    from fastdecode import atomic
    from fastdecode.config import parse_dtype
    from fastdecode.eval.plot import plot_segments
    from fastdecode.eval.record import environment, write_json
    from fastdecode.eval.run import prepare_tokens, run_one, summary_line
    from fastdecode.models import load_model, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parity:
        return parity(args)
    chosen = select(specs, args.configs)
    out = Path(args.out or DEFAULT_OUT.format(model=Path(args.model).name, data=args.data,
                                              n=args.max_tokens))
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    command = canonical_command(sys.argv)
    print(f"sweep: {len(chosen)} of {len(specs)} configs -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=dtype, device=str(dev))
    print(f"loaded {args.model} on {dev} ({dtype}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    ids, data = prepare_tokens(lm, args.data, args.max_tokens)
    env = environment(dev)
    want = {"model": args.model, "dtype": str(dtype).removeprefix("torch."),
            "max_tokens": args.max_tokens, "data": args.data}
    from fastdecode.eval.diagnose import diagnose

    curves, kvs, rows = {}, {}, []
    record_env = None
    diag_kw = dict(before=args.before, after=args.after, smooth=args.smooth)
    for spec in specs:
        path = out / f"{spec.label}.json"
        rec = recorded = None
        if path.exists():
            try:
                rec = json.loads(path.read_text())
                if record_matches(rec, {**want, "mode": spec.mode}):
                    recorded = load_per_token(rec, path)
            except (OSError, KeyError, ValueError):  # JSONDecodeError is a ValueError
                pass
            if recorded is None:
                rec = None
        ref = curves.get("dense") if spec.mode != "dense" else None
        if spec in chosen and (rec is None or args.force):
            result, rec = run_one(lm, ids, data, spec, model_name=args.model,
                                  json_path=path, with_diagnosis=True,
                                  segment=args.segment, progress=not args.no_progress,
                                  extra_config={"sweep": True}, env=env, reference=ref,
                                  diagnose_kw={**diag_kw, "reference_label": "dense"})
            print(summary_line(result), flush=True)
            nll, kv_len = result.nll, result.kv_len
        elif rec is not None:
            nll, kv_len = recorded
            print(f"{spec.label}: recorded, ppl {rec['result']['ppl']:.4f}", file=sys.stderr)
        else:
            continue  # not chosen and not recorded yet
        curves[spec.label], kvs[spec.label] = nll, kv_len
        record_env = record_env or rec.get("environment")  # where the numbers were made
        res = rec["result"]
        # the summary's diagnosis is always paired with dense when dense is recorded
        diag = diagnose(nll=nll, kv_len=kv_len, reference=ref,
                        reference_label="dense" if ref is not None else None, **diag_kw)
        segs = res["segments"]["ppl"] if res["segments"]["size"] == args.segment else \
            [math.exp(float(nll[s:s + args.segment].mean()))
             for s in range(0, len(nll), args.segment)]
        trained = lm.spec.max_position
        rows.append({
            "label": spec.label, "mode": spec.mode, "sink": spec.sink,
            "window": spec.window, "compress_every": spec.compress_every,
            "dtype": rec["config"]["dtype"], "max_kv_len": res["max_kv_len"],
            "ppl": res["ppl"], "ppl_within": seg_ppl(nll, 0, trained),
            "ppl_beyond": seg_ppl(nll, trained, len(nll)),
            "worst_segment": max(segs) if segs else None, "segments": segs,
            "tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"],
            "device": (rec.get("environment") or {}).get("gpu")
            or (rec.get("environment") or {}).get("device"),
            "first_event": diag.get("first_event"), "events": diag.get("events"),
            "diagnosis_signal": diag["signal"],
            "mean_excess_nll_vs_dense": (float(np.mean(nll[:trained] - ref[:trained]))
                                         if ref is not None else None),
            "event_aligned": {k: v for k, v in (diag.get("event_aligned") or {}).items()
                              if k != "curve"} or None,
            "record": path.name,
        })
    if not rows:
        print("nothing recorded yet", file=sys.stderr)
        return 1
    trained = lm.spec.max_position
    summary = summarize(rows, n=args.max_tokens, segment=args.segment, trained=trained,
                        command=command, env=record_env or env, data=data,
                        model=args.name or args.model)
    write_json(summary, out / "summary.json")
    atomic.write_text(out / "table.md", table_md(summary))
    budgets = sorted({s.sink + s.window for s in specs if s.mode != "dense"})
    panels = {}
    for c in budgets:
        labels = ["dense"] + [s.label for s in specs
                              if s.mode != "dense" and s.sink + s.window == c]
        panels[f"cache budget {c}"] = labels
    plot_segments(curves, out / "ppl_segments.png", segment=args.plot_segment,
                  trained_context=trained if trained < args.max_tokens else None,
                  title=f"{args.name or Path(args.model).name} on {args.data}: "
                        f"PPL per {args.plot_segment} tokens",
                  panels=panels)
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'ppl_segments.png'}",
          file=sys.stderr)
    print((out / "table.md").read_text())
    return 0


def parity(args) -> int:
    """Parallel vs token-by-token on the real model: relative PPL difference per mode."""
    from fastdecode.config import parse_dtype
    from fastdecode.eval.ppl import EvalSpec, evaluate
    from fastdecode.eval.record import environment, write_json
    from fastdecode.eval.run import prepare_tokens
    from fastdecode.models import load_model, resolve_device

    dev = resolve_device(args.device)
    lm = load_model(args.model, dtype=parse_dtype(args.dtype), device=str(dev))
    n = args.parity
    checks = [(n, EvalSpec(mode="streaming", sink=4, window=1020)),
              (min(n, 1500), EvalSpec(mode="window", sink=0, window=512, compress_every=32)),
              (min(n, 1000), EvalSpec(mode="dense", sink=0)),
              (min(n, 600), EvalSpec(mode="recompute", sink=0, window=128))]
    out = {"model": args.name or args.model, "data": args.data,
           "environment": environment(dev), "checks": {}}
    worst = 0.0
    for k, spec in checks:
        ids, _ = prepare_tokens(lm, args.data, k)
        a = evaluate(lm.model, ids, spec, progress=not args.no_progress)
        b = evaluate(lm.model, ids, EvalSpec(**{**spec.to_dict(), "method": "token"}),
                     progress=not args.no_progress)
        rel = abs(a.ppl / b.ppl - 1)
        worst = max(worst, rel)
        out["checks"][spec.label] = {
            "n": k, "par": a.ppl, "tok": b.ppl, "rel": rel,
            "max_nll": float(np.max(np.abs(a.nll - b.nll))), "t_par": a.seconds,
            "t_tok": b.seconds}
        print(f"{spec.label} over {k}: parallel {a.ppl:.6f} token {b.ppl:.6f} rel {rel:.2e} "
              f"({a.seconds:.1f} s vs {b.seconds:.1f} s)", flush=True)
    out["worst_rel"] = worst
    path = Path(args.out or ".") / "parity.json"
    write_json(out, path)
    print(f"worst relative PPL difference {worst:.2e} (bar 1e-4); wrote {path}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
