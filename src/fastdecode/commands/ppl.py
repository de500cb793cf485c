"""`fastdecode ppl`: perplexity of a long text through a KV-cache policy.

    fastdecode ppl --model smollm2-135m --data pg19-10146 --max-tokens 16384 \\
        --mode streaming --sink 4 --window 1020 --json out/ppl.json

Modes: dense | window | streaming | recompute (see fastdecode.eval.ppl). The exact parallel
evaluator is the default; ``--method token`` feeds one token per step, as the paper does.
"""

from __future__ import annotations

from ..errors import ConfigError
from .common import add_model_args, load
from .outputs import check_eval_outputs


def add_eval_args(p) -> None:
    g = p.add_argument_group("text")
    g.add_argument("--data", required=True,
                   help="wikitext-2 | pg19-10146 | pg19-10321 | pg19-<id> | a text file | "
                        "a .parquet/.arrow/.jsonl file or a save_to_disk directory (needs "
                        "`datasets`); names are looked up in $FASTDECODE_DATA, the repo's "
                        "data/, ../shared/data")
    g.add_argument("--max-tokens", type=int, default=4096,
                   help="tokens scored (the text must have one more)")
    g.add_argument("--text-column", default="text", help="dataset column holding the text")
    g.add_argument("--split", default=None, help="dataset split (default: test, or the only)")
    g.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token")
    g = p.add_argument_group("evaluation")
    g.add_argument("--mode", choices=("dense", "window", "streaming", "recompute"),
                   default="streaming")
    g.add_argument("--sink", type=int, default=None,
                   help="attention sinks (default: 4 for streaming, 0 otherwise)")
    g.add_argument("--window", type=int, default=1020, help="most recent tokens kept")
    g.add_argument("--compress-every", type=int, default=1,
                   help="lazy eviction every R tokens (1 = strict)")
    g.add_argument("--position-mode", choices=("cache", "absolute"), default="cache")
    g.add_argument("--kv-dtype", choices=("auto", "int8"), default="auto")
    g.add_argument("--method", choices=("parallel", "token"), default="parallel",
                   help="parallel: exact, many tokens per pass (default); token: one step "
                        "per token")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per parallel pass (default: 4096 with the flash prefill "
                        "kernel, 512 with the reference attention)")
    g.add_argument("--recompute-batch", type=int, default=None,
                   help="recompute: contexts per batched pass (default: auto)")
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="write the JSON record here")
    g.add_argument("--per-token", default=None,
                   help="per-token NLL file (.csv or .npz; default with --json: "
                        "<json stem>.nll.csv)")
    g.add_argument("--segment", type=int, default=1024,
                   help="tokens per segment for the per-segment PPL")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("diagnosis (spikes around eviction events)")
    g.add_argument("--diagnose", action="store_true",
                   help="add eviction events and NLL spike metrics to the record")
    g.add_argument("--before", type=int, default=256, help="baseline steps before an event")
    g.add_argument("--after", type=int, default=512, help="horizon after an event")
    g.add_argument("--smooth", type=int, default=32, help="smoothing width for peak/width")
    g.add_argument("--reference", choices=("none", "dense"), default=None,
                   help="pair the spike metrics with a dense run on the same tokens (NLL "
                        "minus dense NLL; removes text difficulty). Default: dense for "
                        "`fastdecode diagnose`, none for `ppl --diagnose`")


def add_parser(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity of a long text through a KV-cache policy")
    add_model_args(p)
    p.set_defaults(dtype="float32")  # PPL is measured in fp32 unless asked otherwise
    add_eval_args(p)
    p.set_defaults(run=run)


def eval_spec(args):
    from ..eval.ppl import EvalSpec

    sink = args.sink if args.sink is not None else (4 if args.mode == "streaming" else 0)
    if args.mode == "dense" and (args.sink or args.compress_every != 1):
        raise ConfigError("dense keeps every token: --sink/--compress-every do not apply")
    return EvalSpec(mode=args.mode, sink=sink, window=args.window,
                    compress_every=args.compress_every, position_mode=args.position_mode,
                    kv_dtype=args.kv_dtype, method=args.method, chunk_size=args.chunk_size,
                    recompute_batch=args.recompute_batch)


def run(args, with_diagnosis: bool | None = None) -> int:
    from ..eval.data import load_text
    from ..eval.run import prepare_tokens, run_one, summary_line

    spec = eval_spec(args)  # validate everything cheap before the (slow) load
    diag = args.diagnose if with_diagnosis is None else with_diagnosis
    if args.segment < 1:
        raise ConfigError(f"--segment must be >= 1, got {args.segment}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 (tokens scored), got {args.max_tokens}")
    if diag:
        for flag, v in (("--before", args.before), ("--after", args.after),
                        ("--smooth", args.smooth)):
            if v < 1:
                raise ConfigError(f"{flag} must be >= 1, got {v}")
    check_eval_outputs(args)
    load_text(args.data, text_column=args.text_column, split=args.split)
    lm = load(args)
    ids, data = prepare_tokens(lm, args.data, args.max_tokens, text_column=args.text_column,
                               split=args.split, bos=args.bos)
    ref_mode = args.reference or ("dense" if with_diagnosis else "none")
    reference = None
    if diag and ref_mode == "dense" and spec.mode != "dense":
        from ..eval.ppl import EvalSpec, evaluate

        reference = evaluate(lm.model, ids, EvalSpec(mode="dense", sink=0,
                                                     chunk_size=args.chunk_size),
                             progress=not args.no_progress, desc="reference: dense")
    result, record = run_one(
        lm, ids, data, spec, model_name=args.model, json_path=args.json,
        per_token_path=args.per_token, with_diagnosis=diag, segment=args.segment,
        progress=not args.no_progress,
        diagnose_kw=dict(before=args.before, after=args.after, smooth=args.smooth),
        reference=reference)
    print(summary_line(result))
    segs = record["result"]["segments"]
    print(f"per-{segs['size']} segment ppl: " + " ".join(f"{v:.2f}" for v in segs["ppl"]))
    if record["per_token"]:
        print(f"per-token NLL: {record['per_token']['path']}")
    if args.json:
        print(f"record: {args.json}")
    if record["diagnosis"]:
        print_diagnosis(record["diagnosis"])
    return 0


def print_diagnosis(d: dict) -> None:
    ev = d["events"]
    if not ev["count"]:
        print("eviction events: none (nothing left the attention span)")
        return
    print(f"eviction events: {ev['count']} ({ev['tokens_dropped']} tokens dropped; first at "
          f"step {ev['first_step']}{'; strict, one per step' if ev['strict'] else ''})")
    what = "nll - " + d["reference"] if d.get("reference") else "nll"
    if d.get("mean_excess_nll") is not None:
        print(f"mean excess nll vs {d['reference']}: {d['mean_excess_nll']:+.4f} "
              f"(after the first event: {d.get('mean_excess_nll_after_first_event', 0):+.4f})")
    fe = d["first_event"]
    if fe:
        print(f"first event @ {fe['step']}: baseline {what} {fe['baseline']:.3f}, peak "
              f"+{fe['peak']:.3f} at +{fe['peak_offset']}, area {fe['area']:.1f}, width "
              f"{fe['width']}{' (persistent)' if fe['persistent'] else ''}")
    ea = d["event_aligned"]
    if ea:
        print(f"event-aligned ({ea['events_used']} events, period {ea['period']}): peak "
              f"+{ea['peak']:.3f} at +{ea['peak_offset']}, area {ea['area']:.2f}, width "
              f"{ea['width']}")
