"""`fastdecode quantize`: write a weight-only quantized checkpoint any command can load."""

from __future__ import annotations

import sys

from ..errors import InputError
from .common import add_model_args, load
from .outputs import check_checkpoint_out


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linears and save the checkpoint")
    add_model_args(p)
    p.add_argument("--recipe", required=True,
                   help="int8 | int8-mlp | int4-mlp-g128 | int4-g64 | int4-attn-g128 | ... "
                        "(int4: append -search (default, data-free), -rtn, -gptq (calibrated "
                        "on wikitext-2 + PG19 10321) or -kd (GPTQ, then distilled against "
                        "the model itself: a GPU job) to choose how the codes are chosen; "
                        "append +head to quantize the output head too)")
    p.add_argument("--out", required=True,
                   help="output directory (new or empty; written beside, renamed into place "
                        "when complete)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (never the source model or a directory "
                        "holding it)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..eval.calibration import calibration_for
    from ..quant import QuantConfig, quantize_model
    from ..quant.checkpoint import save_quantized

    cfg = QuantConfig.parse(args.recipe)  # validate before the (slow) load
    check_checkpoint_out(args)
    lm = load(args)
    if lm.quant is not None:
        raise InputError(f"{args.model} is already quantized ({lm.quant.name})")
    if cfg.method == "kd" and lm.model.device.type != "cuda":
        print("note: -kd distils on this device; on a CPU that takes hours for SmolLM2-135M "
              "(about 2.5 min on an H100): --device cuda", file=sys.stderr)
    names = quantize_model(lm.model, cfg, calibration=calibration_for(lm, cfg), progress=True)
    out = save_quantized(lm, cfg, args.out, force=args.force)
    print(f"quantized {len(names)} linears with {cfg.name}; wrote {out}")
    return 0
