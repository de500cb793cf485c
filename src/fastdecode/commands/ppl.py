"""`fastdecode ppl`: perplexity of a long text through a KV-cache policy (every policy of
the registry, with its flags, or recompute; docs/ppl.md)."""

from __future__ import annotations

from ..errors import ConfigError
from .common import add_cache_args, add_model_args, cache_options, load
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
    from ..eval.ppl import MODES

    g.add_argument("--mode", choices=MODES, default="streaming",
                   help="a cache policy, or recompute (default: streaming)")
    add_cache_args(p, policy=None, group=g)  # --sink (default 4 for streaming, else 0), ...
    g.add_argument("--method", choices=("parallel", "token"), default=None,
                   help="parallel: exact, many tokens per pass (default); token: one step "
                        "per token (the default and only method for h2o and tova)")
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
    from ..eval.ppl import RING_MODES, EvalSpec

    opts = cache_options(args)
    run = dict(mode=args.mode, method=args.method, chunk_size=args.chunk_size,
               recompute_batch=args.recompute_batch)
    if args.mode not in RING_MODES:
        return EvalSpec(**run, options=opts)
    sink = opts.pop("sink", 4 if args.mode == "streaming" else 0)
    if args.mode == "dense" and (sink or opts.get("compress_every", 1) != 1):
        raise ConfigError("dense keeps every token: --sink/--compress-every do not apply")
    ring = {k: opts.pop(k) for k in ("window", "compress_every", "position_mode", "kv_dtype")
            if k in opts}
    if opts:
        flags = ", ".join("--" + k.replace("_", "-") for k in opts)
        raise ConfigError(f"{flags} do(es) not apply to mode {args.mode}")
    return EvalSpec(**run, sink=sink, **ring)


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
    if getattr(getattr(spec.cache_config(1), "cache_class", None), "score_based", False):
        print(f"note: {spec.mode} evicts by attention score: evaluated token by token (the "
              "exact parallel evaluator does not apply)")
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
