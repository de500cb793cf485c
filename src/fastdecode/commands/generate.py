"""`fastdecode generate`: stream generated text to the terminal."""

from __future__ import annotations

import sys

from ..config import COMPILE_MODES, KERNEL_MODES
from ..errors import ConfigError, InputError
from .common import add_cache_args, add_model_args, cache_config, load


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    add_model_args(p)
    add_cache_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk length (default: 16384 with the flash prefill kernel, "
                        "512 with the reference attention)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="none (eager) | default (compiled kernels) | graphs (one CUDA graph "
                        "per step; CUDA only). Default: graphs on CUDA, none on the CPU")
    p.add_argument("--kernels", choices=KERNEL_MODES, default="auto",
                   help="fused (our Triton step) | inductor (torch.compile); auto = fused on "
                        "CUDA, inductor elsewhere")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..engine import Decoder, check_sampling, generate

    if not args.prompt:
        raise InputError("empty prompt: --prompt must not be empty")
    cfg = cache_config(args)
    # everything cheap is checked before the (slow) load
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {args.chunk_size}")
    lm = load(args)
    if lm.tokenizer is None:
        raise InputError(f"model {args.model} has no tokenizer; cannot encode a text prompt")
    ids = lm.tokenizer.encode(args.prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    dec = Decoder.build(lm.model, cfg, chunk_size=args.chunk_size)
    mode = args.compile or ("graphs" if lm.model.device.type == "cuda" else "none")
    if mode != "none":
        from ..compile import compile_decoder

        compile_decoder(dec, mode, kernels=args.kernels)
    out: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    for tok in generate(dec, ids, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        eos_token_id=lm.spec.eos_token_id):
        out.append(tok)
        text = lm.tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for multi-byte characters to complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0
