"""Output paths of the commands, checked before any model is loaded or any work starts: a
run that can only fail when it writes its results must fail at once, in one line naming
the path, with nothing written (fastdecode.atomic holds the checks and the writers)."""

from __future__ import annotations

from pathlib import Path

from ..atomic import check_distinct, check_output_dir, check_output_file


def model_source(model: str) -> Path | None:
    """The local path a ``--model`` argument reads (None for a preset or a name)."""
    p = Path(model)
    return p if p.exists() else None


def check_eval_outputs(args) -> tuple[str | None, str | None]:
    """ppl / diagnose: ``--json`` and ``--per-token`` (defaulted from ``--json`` as the run
    will) are writable files, distinct, and not the model or the text read."""
    from ..eval.run import per_token_path_for

    per_token = args.per_token
    if per_token is None and args.json is not None:
        per_token = str(per_token_path_for(args.json))
    for flag, path in (("--json", args.json), ("--per-token", per_token)):
        if path is not None:
            check_output_file(path, f"{flag} file")
            _not_a_source(path, flag, model_source(args.model), _existing(args.data))
    check_distinct(**{"--json": args.json, "--per-token": per_token})
    return args.json, per_token


def check_bench_outputs(args) -> None:
    """bench: ``--json`` and the ``--profile`` traces (the second one, ``-nograph``, when
    a CUDA graph is profiled) are writable and distinct."""
    traces = {}
    if args.profile:
        traces["--profile"] = args.profile
        traces["--profile (no-graph trace)"] = args.profile.replace(".json", "-nograph.json")
    for flag, path in (("--json", args.json), *traces.items()):
        if path is not None:
            check_output_file(path, f"{flag} file")
            _not_a_source(path, flag, model_source(args.model))
    check_distinct(**{"--json": args.json, **traces})


def check_checkpoint_out(args) -> None:
    """quantize: ``--out`` is a directory that can be created or replaced (non-empty only
    with ``--force``) and is neither the source model, inside it, nor around it."""
    check_output_dir(args.out, force=args.force, protect=(model_source(args.model),),
                     what="--out directory")


def _not_a_source(path: str, flag: str, *sources: Path | None) -> None:
    """An output must not overwrite what the run reads: the model file, a file inside the
    model directory, the text file."""
    from ..errors import OutputError

    rp = Path(path).resolve()
    for src in sources:
        if src is None:
            continue
        rs = src.resolve()
        if rp == rs or (rs.is_dir() and rs in rp.parents and rp.exists()):
            raise OutputError(f"{flag} file {path} would overwrite {src}, which this run "
                              "reads")


def _existing(path: str | None) -> Path | None:
    return Path(path) if path is not None and Path(path).is_file() else None
