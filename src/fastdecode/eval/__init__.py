"""Perplexity on long text: text sources, token-by-token and exact parallel streaming PPL,
recomputation baseline, NLL spike diagnosis, records and plots. See docs/ppl.md."""

from .data import DataSourceError, TextSource, data_dirs, load_text, take_tokens, tokenize
from .diagnose import diagnose, eviction_events, read_per_token, write_per_token
from .ppl import METHODS, MODES, EvalSpec, PPLResult, attended, evaluate, segment_ppl

__all__ = ["DataSourceError", "TextSource", "data_dirs", "load_text", "take_tokens",
           "tokenize", "diagnose", "eviction_events", "read_per_token", "write_per_token",
           "METHODS", "MODES", "EvalSpec", "PPLResult", "attended", "evaluate", "segment_ppl"]
