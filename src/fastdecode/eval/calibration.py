"""Calibration text for the quantizers that need it (GPTQ, distillation), read at the eval
layer and handed to ``quantize_model`` by its caller, so the quantizers take token ids and
know nothing of text sources."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..quant.distill import SHARES
from ..quant.gptq import CALIB_TOKENS
from .data import load_text, tokenize

# Never PG19 10146, the book the perplexity target is measured on.
CALIBRATION = ("wikitext-2", "pg19-10321")


def calibration_tokens(tokenizer, sources=CALIBRATION, n_tokens: int | None = None,
                       totals: tuple[int, ...] | None = None) -> torch.Tensor:
    """Token ids: ``n_tokens`` shared equally by the sources' starts, then each source's rest
    up to its ``totals`` entry (distillation's; GPTQ reads the first ``n_tokens``)."""
    n_tokens = n_tokens or CALIB_TOKENS
    per = n_tokens // len(sources)
    totals = totals or (per,) * len(sources)
    if len(totals) != len(sources) or min(totals) < per:
        raise ConfigError(f"calibration totals {totals} must give each of {sources} at "
                          f"least {per} tokens")
    texts = []
    for src, total in zip(sources, totals):
        got = tokenize(load_text(src), tokenizer)
        if len(got) < total:
            raise InputError(f"calibration source {src!r} has {len(got)} tokens; "
                             f"{total} needed")
        texts.append(got[:total])
    ids = [t for got in texts for t in got[:per]] + [t for got in texts for t in got[per:]]
    return torch.tensor(ids, dtype=torch.long)


def calibration_for(lm, cfg) -> torch.Tensor | None:
    """The calibration tokens the recipe ``cfg`` needs for the loaded model ``lm``, or None."""
    if cfg.calibrates and lm.tokenizer is None:
        raise ConfigError(f"{cfg.name} calibrates on text and needs the model's tokenizer; "
                          f"{lm.source} has none (use -search or -rtn)")
    if cfg.method == "gptq":
        return calibration_tokens(lm.tokenizer)
    if cfg.method == "kd":
        return calibration_tokens(lm.tokenizer, totals=SHARES)
    return None


__all__ = ["CALIBRATION", "calibration_tokens", "calibration_for"]
