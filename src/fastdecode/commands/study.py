"""`fastdecode study`: the team's ablation table in one command (see fastdecode.study).

    fastdecode study --model pythia-2.8b --random-weights --out runs/study \\
        --configs peer:team-streaming,bf16-stream-graphs,int8-all-graphs,int4-mlp-g128-graphs \\
        --baseline peer:team-streaming --baseline-runs 3

Speed on --model, perplexity on --ppl-model (default: --model if it has real weights, else
the bundled SmolLM2-135M). Run it again with the same arguments to resume.
"""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(sub) -> None:
    from ..config import COMPILE_MODES

    p = sub.add_parser("study", help="an ablation table over registry configurations and "
                                     "peers: TPOT, TTFT, total, memory, PPL; resumable")
    add_model_args(p)
    g = p.add_argument_group("rows")
    g.add_argument("--configs", type=_list, required=True,
                   help="comma list of registry configurations (fastdecode.registry) and "
                        "peers: peer:team-streaming, peer:team-streaming-lazy, peer:hf-eager, "
                        "peer:hf-static-compile, peer:hf-torchao-int8, "
                        "peer:hf-torchao-int4-mlp-g128; 'all' = every registry configuration")
    g.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="one compile mode for every configuration (default: each its own; "
                        "graphs runs as default on a CPU)")
    g.add_argument("--peer-sink", type=int, default=4, help="team-streaming peers' sinks")
    g.add_argument("--peer-window", type=int, default=2048, help="team-streaming peers' window")
    g.add_argument("--peer-lazy-every", type=int, default=32,
                   help="team-streaming-lazy prunes every R tokens")
    g = p.add_argument_group("the benchmark")
    g.add_argument("--prompt-len", type=int, default=16384)
    g.add_argument("--new-tokens", type=int, default=1024)
    g.add_argument("--warmup-tokens", type=int, default=32,
                   help="first decode steps left out of TPOT")
    g.add_argument("--data", type=_list, default=None,
                   help="comma list of text sources for PPL (as fastdecode ppl --data; default "
                        "pg19-10146,wikitext-2 where available)")
    g.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored per source "
                   "(0: no perplexity)")
    g.add_argument("--ppl-model", default=None, help="the model for PPL (default: --model if "
                   "it has real weights, else smollm2-135m)")
    g.add_argument("--text-column", default="text")
    g.add_argument("--split", default=None)
    g = p.add_argument_group("baseline (measured once, stored, reused)")
    g.add_argument("--baseline", default=None, help="the row every other is compared with")
    g.add_argument("--baseline-runs", type=int, default=1, help="its figure: the mean of N")
    g.add_argument("--baseline-store", type=Path, default=None,
                   help="where baselines are kept (default $FASTDECODE_CACHE/study-baselines)")
    g.add_argument("--refresh-baseline", action="store_true", help="measure it again")
    g.add_argument("--baseline-max-age", type=float, default=None, metavar="DAYS",
                   help="re-measure a stored baseline older than this")
    p.add_argument("--out", type=Path, required=True,
                   help="study directory: records/, study.json, study.md, tpot_ppl.png")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import registry, study

    configs = list(registry.CONFIGS) if args.configs == ["all"] else args.configs
    s = study.Study(
        model=args.model, configs=configs, out=args.out, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, warmup_tokens=args.warmup_tokens,
        data=tuple(args.data) if args.data is not None else None, ppl_tokens=args.ppl_tokens,
        ppl_model=args.ppl_model, device=args.device, dtype=args.dtype,
        random_weights=args.random_weights, revision=args.revision, compile=args.compile,
        seed=args.seed, text_column=args.text_column, split=args.split,
        peer_sink=args.peer_sink, peer_window=args.peer_window,
        peer_lazy_every=args.peer_lazy_every, baseline=args.baseline,
        baseline_runs=args.baseline_runs, baseline_store=args.baseline_store,
        refresh_baseline=args.refresh_baseline, baseline_max_age_days=args.baseline_max_age)
    study.run(s, log=lambda *a: print(*a, flush=True))
    return 0
