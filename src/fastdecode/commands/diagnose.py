"""`fastdecode diagnose`: `fastdecode ppl` with the NLL diagnosis on ("Phase A"), paired
with a dense run by default (docs/ppl.md)."""

from __future__ import annotations

from . import ppl
from .common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="per-token NLL around eviction events (spike metrics)")
    add_model_args(p)
    p.set_defaults(dtype="float32")
    ppl.add_eval_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    return ppl.run(args, with_diagnosis=True)
