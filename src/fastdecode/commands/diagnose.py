"""`fastdecode diagnose`: `fastdecode ppl` with the NLL diagnosis on ("Phase A").

Writes per-token NLL, attention span and tokens dropped per step, and summarises the NLL
spikes around eviction events (peak, area, width; see fastdecode.eval.diagnose).

    fastdecode diagnose --model smollm2-135m --data pg19-10146 --max-tokens 8192 \\
        --mode window --window 1024 --json out/diag.json
"""

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
