"""Argument groups shared by commands: the model, the cache, the compile mode."""

from __future__ import annotations

import argparse

from ..cache import POLICIES, CacheConfig, PolicyConfig, policy_options
from ..config import parse_dtype


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="smollm2-135m, a shape preset (pythia-2.8b, pythia-160m, tiny-neox, "
                        "tiny-llama), a local Hugging Face directory (sharded or not), a "
                        "hub-cache directory models--ORG--NAME, a repo id ORG/NAME found in "
                        "the local Hugging Face cache (offline), or a .gguf file")
    g.add_argument("--revision", default=None,
                   help="hub-cache models: the ref or commit to load (default: main)")
    g.add_argument("--random-weights", action="store_true",
                   help="keep the model's shapes, randomise the values (speed runs)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 "
                   "(default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")


def add_cache_args(p: argparse.ArgumentParser, policy: str | None = "streaming",
                   group=None) -> None:
    """``--policy`` (unless ``policy`` is None) and one flag per option of any registered
    policy, defaulting to None (the policy's own default; foreign ones refused later)."""
    g = group or p.add_argument_group("KV cache")
    if policy is not None:
        g.add_argument("--policy", choices=tuple(POLICIES), default=policy,
                       help=f"cache policy (default: {policy})")
    for name, opt in policy_options().items():
        defaults = opt["defaults"]
        if len(set(defaults.values())) == 1:
            shown = f"default {next(iter(defaults.values()))}"
        else:
            shown = "defaults " + ", ".join(f"{k} {v}" for k, v in defaults.items())
        which = "" if len(defaults) == len(POLICIES) else ", ".join(defaults) + "; "
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=opt["type"],
                       choices=opt["choices"], default=None,
                       help=f"{opt['help']} ({which}{shown})".replace("%", "%%"))


def cache_options(args) -> dict:
    """The cache options given on the command line (flags left out are not included)."""
    return {name: getattr(args, name) for name in policy_options()
            if getattr(args, name, None) is not None}


def cache_config(args) -> PolicyConfig:
    return CacheConfig(policy=args.policy, **cache_options(args))


def load(args):
    """Load the model named by the model args (dtype defaulted per device)."""
    import torch

    from ..models import load_model, resolve_device

    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return load_model(args.model, dtype=dtype, device=str(dev),
                      random_weights=args.random_weights, seed=args.seed,
                      revision=getattr(args, "revision", None))
