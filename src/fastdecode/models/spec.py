"""One normalised description of a decoder architecture: its shapes, plus its family's
switches read through properties (``norm``, ``mlp``, ``parallel_residual``, ``has_bias``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from . import families
from .families import Family


@dataclass(frozen=True)
class ModelSpec:
    family: str  # a key of families.FAMILIES (the Hugging Face model_type)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rotary_dim: int  # dims of each head that are rotated (partial rotary for NeoX)
    rope_theta: float
    norm_eps: float
    max_position: int  # trained context (informational: caches may go past it)
    tie_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def arch(self) -> Family:
        """The family object: switches and loaders."""
        return families.get(self.family)

    @property
    def norm(self) -> str:  # families.NORMS
        return self.arch.norm

    @property
    def mlp(self) -> str:  # families.MLPS
        return self.arch.mlp

    @property
    def parallel_residual(self) -> bool:
        return self.arch.parallel_residual

    @property
    def has_bias(self) -> bool:
        return self.arch.bias

    def validate(self) -> ModelSpec:
        problems = []
        if self.family not in families.FAMILIES:
            problems.append(f"family {self.family!r} is not one of {tuple(families.FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                                f"num_heads {self.num_heads}")
            elif self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads {self.num_heads} is not divisible by "
                                f"num_kv_heads {self.num_kv_heads}")
            elif not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
                problems.append(f"rotary_dim {self.rotary_dim} must be even and in "
                                f"(0, head_dim={self.head_dim}]")
        if problems:
            raise ModelLoadError("invalid model spec: " + "; ".join(problems))
        return self

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelSpec:
        """Build a spec from a Hugging Face ``config.json`` dict (its family by model_type)."""
        fam = families.get(cfg.get("model_type"))
        try:
            fields = fam.spec_fields(cfg)
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the key {e.args[0]!r}") from None
        return cls(family=fam.name, **fields).validate()
