"""Weight-only quantization: a recipe (``QuantConfig``, parsed from names such as
``int4-mlp-g128-gptq``) applied by a pure function that swaps in storage modules
(recipes and int4 methods: docs/quant.md)."""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .int4 import GROUP_SIZES, Int4Linear
from .int8 import Int8Linear

# Filters: which canonical linear names a recipe touches (lm_head only with +head).
FILTERS = {
    "all": re.compile(r"layers\.\d+\.(attn\.(qkv|out)|mlp\.(up|down))$"),
    "mlp": re.compile(r"layers\.\d+\.mlp\.(up|down)$"),
    "mlp_up": re.compile(r"layers\.\d+\.mlp\.up$"),
    "attn": re.compile(r"layers\.\d+\.attn\.(qkv|out)$"),
}
KINDS = {"int8": Int8Linear, "int4": Int4Linear}
METHODS = {"int8": ("rtn",), "int4": ("search", "rtn", "gptq", "kd")}  # the first is the default
_RECIPE = re.compile(r"^(int8|int4)(?:-(all|mlp|mlp_up|attn))?(?:-g(\d+))?"
                     r"(?:-(search|rtn|gptq|kd))?(\+head)?$")


@dataclass(frozen=True)
class QuantConfig:
    kind: str  # int8 | int4
    filter: str = "all"
    group_size: int = 128  # int4 only
    head: bool = False
    method: str | None = None  # None: the kind's default (METHODS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"quantization kind {self.kind!r} is not one of {tuple(KINDS)}")
        if self.method is None:
            object.__setattr__(self, "method", METHODS[self.kind][0])
        if self.method not in METHODS[self.kind]:
            raise ConfigError(f"{self.kind} method {self.method!r} is not one of "
                              f"{METHODS[self.kind]}")
        if self.filter not in FILTERS:
            raise ConfigError(f"filter {self.filter!r} is not one of {tuple(FILTERS)}")
        if self.kind == "int4" and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 group size {self.group_size} is not one of {GROUP_SIZES}")

    @classmethod
    def parse(cls, recipe: str) -> QuantConfig:
        m = _RECIPE.match(recipe.strip())
        if not m:
            raise ConfigError(f"unknown quantization recipe {recipe!r}; expected e.g. int8, "
                              "int8-mlp, int4-mlp-g128, int4-mlp-g128-gptq, int4-g64+head "
                              f"(filters: {', '.join(FILTERS)}; int4 groups: {GROUP_SIZES}; "
                              f"int4 methods: {', '.join(METHODS['int4'])})")
        kind, filt, group, method, head = m.groups()
        if kind == "int8" and group:
            raise ConfigError(f"recipe {recipe!r}: int8 is per-channel and takes no group size")
        return cls(kind, filt or "all", int(group) if group else 128, bool(head), method)

    @property
    def name(self) -> str:
        g = f"-g{self.group_size}-{self.method}" if self.kind == "int4" else ""
        return f"{self.kind}-{self.filter}{g}{'+head' if self.head else ''}"

    @property
    def calibrates(self) -> bool:
        """Whether the method needs calibration text (``gptq``, ``kd``)."""
        return self.method in ("gptq", "kd")

    def matches(self, module_name: str) -> bool:
        if module_name == "lm_head":
            return self.head
        return bool(FILTERS[self.filter].search(module_name))

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_model(model: nn.Module, cfg: QuantConfig,
                   calibration: torch.Tensor | None = None, progress: bool = False) -> list[str]:
    """Replace matching nn.Linear modules in place; returns the names replaced.
    ``calibration``: token ids from the caller (``eval.calibration``), for gptq and kd."""
    cls = KINDS[cfg.kind]
    targets = {name: mod for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and cfg.matches(name)}
    if cfg.head and getattr(model.spec, "tie_embeddings", False):
        raise ConfigError("+head with tied embeddings would quantize the embeddings too; "
                          "not supported")

    def replace(name, **kw):
        model.set_submodule(name, cls.from_linear(targets[name], group_size=cfg.group_size, **kw))

    if cfg.calibrates:
        from .gptq import CALIB_TOKENS, gptq_int4, input_moments, moment_batches

        if calibration is None:
            raise ConfigError(f"{cfg.name} needs calibration tokens "
                              "(fastdecode.eval.calibration.calibration_for)")
        teacher = copy.deepcopy(model).float() if cfg.method == "kd" else None
        for batch in moment_batches(model, list(targets)):  # later batches see earlier ones
            moments = input_moments(model, batch, calibration[:CALIB_TOKENS])  # quantized
            for name in batch:
                w = targets[name].weight.detach()
                replace(name, codes=gptq_int4(w, moments.pop(name), cfg.group_size))
        if teacher is not None:
            from .distill import distill_int4

            distill_int4(model, teacher, calibration, progress=progress)
    else:
        for name in targets:
            replace(name, method=cfg.method)
    return list(targets)


def set_backend(model: nn.Module, backend: str = "auto") -> None:
    """Choose the kernel every quantized linear of ``model`` uses (``auto``: ``reference``
    off CUDA, else the fastest measured, perf/results/h100-quant-gemv.json)."""
    for mod in model.modules():
        if isinstance(mod, (Int8Linear, Int4Linear)):
            auto = AUTO[mod.kind] if mod.weight.is_cuda else "reference"
            mod.set_backend(auto if backend == "auto" else backend)


AUTO = {"int8": "inductor", "int4": "tinygemm"}  # the fastest in a graph of Pythia's GEMVs

__all__ = ["set_backend", "QuantConfig", "quantize_model", "Int8Linear", "Int4Linear", "FILTERS",
           "METHODS"]
