"""One perplexity run end to end (what ``fastdecode ppl`` and ``scripts/ppl_sweep.py`` do):
text -> tokens -> evaluation -> per-token file, diagnosis, JSON record."""

from __future__ import annotations

from pathlib import Path

from .data import load_text, take_tokens, tokenize
from .diagnose import COLUMNS, diagnose, write_per_token
from .ppl import EvalSpec, PPLResult, evaluate
from .record import build_record, environment, write_json


def prepare_tokens(lm, source: str, max_tokens: int, *, text_column: str = "text",
                   split: str | None = None, bos: bool = False) -> tuple[list[int], dict]:
    """The first ``max_tokens + 1`` token ids of ``source`` and a description of it."""
    src = load_text(source, text_column=text_column, split=split)
    ids = tokenize(src, lm.tokenizer, bos=bos)
    desc = src.describe()
    desc.update(tokens_available=len(ids), bos=bos)
    return take_tokens(ids, max_tokens, f"data source {source!r}"), desc


def per_token_path_for(json_path: str | Path) -> Path:
    p = Path(json_path)
    return p.with_name(p.name.removesuffix(".json") + ".nll.csv")


def run_one(lm, ids: list[int], data: dict, spec: EvalSpec, *, model_name: str,
            json_path: str | Path | None = None, per_token_path: str | Path | None = None,
            with_diagnosis: bool = False, segment: int = 1024, progress: bool = True,
            diagnose_kw: dict | None = None, extra_config: dict | None = None,
            env: dict | None = None, reference: PPLResult | None = None,
            ) -> tuple[PPLResult, dict]:
    """Evaluate ``ids`` with ``spec``; write the per-token file and the record if asked
    (``reference``: the run the diagnosis is paired with)."""
    result = evaluate(lm.model, ids, spec, progress=progress)
    diag = (diagnose(result, reference=reference, **(diagnose_kw or {}))
            if with_diagnosis else None)
    if per_token_path is None and json_path is not None:
        per_token_path = per_token_path_for(json_path)
    per_token = None
    if per_token_path is not None:
        written = write_per_token(result, ids, per_token_path)
        per_token = {"path": str(written), "format": written.suffix.lstrip("."),
                     "columns": list(COLUMNS)}
        if json_path is not None:  # also relative to the record, so the pair can move
            try:
                per_token["relative_to_record"] = str(
                    Path(written).resolve().relative_to(Path(json_path).resolve().parent))
            except ValueError:
                pass
    config = {"model": model_name, "model_source": lm.source,
              "dtype": str(lm.model.dtype).removeprefix("torch."),
              "device": str(lm.model.device), "quant": getattr(lm.quant, "name", None),
              "max_tokens": result.n, **(extra_config or {})}
    record = build_record(result=result, config=config, data=data,
                          env=env if env is not None else environment(lm.model.device),
                          per_token=per_token, segment=segment, diagnosis=diag)
    if json_path is not None:
        write_json(record, json_path)
    return result, record


def summary_line(result: PPLResult) -> str:
    return (f"{result.spec.label}: ppl {result.ppl:.4f} (mean nll {result.mean_nll:.4f} over "
            f"{result.n} tokens, {result.spec.method}, {result.seconds:.1f} s, "
            f"{result.n / max(result.seconds, 1e-9):.1f} tok/s)")
