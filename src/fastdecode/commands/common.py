"""Argument groups shared by commands: the model, the cache, the compile mode."""

from __future__ import annotations

import argparse

from ..config import KV_DTYPES, POLICIES, POSITION_MODES, CacheConfig, parse_dtype


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="smollm2-135m, a shape preset (pythia-2.8b, pythia-160m, tiny-neox, "
                        "tiny-llama), a local Hugging Face directory, or a .gguf file")
    g.add_argument("--random-weights", action="store_true",
                   help="keep the model's shapes, randomise the values (speed runs)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 "
                   "(default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")


def add_cache_args(p: argparse.ArgumentParser, policy: str = "streaming") -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--policy", choices=POLICIES, default=policy)
    g.add_argument("--sink", type=int, default=4, help="attention sinks kept (streaming)")
    g.add_argument("--window", type=int, default=1020, help="most recent tokens kept")
    g.add_argument("--compress-every", type=int, default=1,
                   help="lazy eviction: evict back to the window every R tokens (1 = strict)")
    g.add_argument("--position-mode", choices=POSITION_MODES, default="cache")
    g.add_argument("--max-len", type=int, default=8192, help="dense cache capacity")
    g.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV storage: the model dtype, or int8 with per-head, per-token scales")


def cache_config(args) -> CacheConfig:
    sink = args.sink if args.policy == "streaming" else 0
    return CacheConfig(policy=args.policy, sink=sink, window=args.window,
                       compress_every=args.compress_every, position_mode=args.position_mode,
                       max_len=args.max_len, kv_dtype=args.kv_dtype)


def load(args):
    """Load the model named by the model args (dtype defaulted per device)."""
    import torch

    from ..models import load_model, resolve_device

    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return load_model(args.model, dtype=dtype, device=str(dev),
                      random_weights=args.random_weights, seed=args.seed)
