"""The torchao peers (#26, the study): the transformers model quantized in place by
torchao's ``quantize_``, then timed as the static-cache + compile peer (bench/peers.py)."""

from __future__ import annotations

import torch

from ..errors import ConfigError

TORCHAO = {"hf-torchao-int8": "int8", "hf-torchao-int4-mlp-g128": "int4-mlp-g128"}


class PeerUnavailable(ConfigError):
    """A peer whose optional package is missing: skipped, with a message saying why."""


def torchao_quantize(model, kind: str) -> None:
    """torchao 0.18's ``quantize_`` in place: int8 weight-only on every linear, or int4
    group-128 weight-only (tinygemm packing: CUDA, bfloat16) on the MLP linears only."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise PeerUnavailable("torchao is not installed (pip install torchao==0.18.0); the "
                              "torchao peers are skipped") from None
    if kind == "int8":
        quantize_(model, Int8WeightOnlyConfig())
    else:
        quantize_(model, Int4WeightOnlyConfig(group_size=128,
                                              int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and ".mlp." in fqn)
