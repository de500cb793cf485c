"""One normalised description of a decoder architecture (GPT-NeoX or Llama family)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelLoadError

FAMILIES = ("gpt_neox", "llama")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "gpt_neox" | "llama"
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
    def parallel_residual(self) -> bool:
        return self.family == "gpt_neox"

    @property
    def has_bias(self) -> bool:
        return self.family == "gpt_neox"

    def with_(self, **changes) -> ModelSpec:
        return replace(self, **changes)

    def validate(self) -> ModelSpec:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
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
        """Build a spec from a Hugging Face ``config.json`` dict (GPTNeoX or Llama)."""
        model_type = cfg.get("model_type")
        try:
            if model_type == "gpt_neox":
                heads = cfg["num_attention_heads"]
                head_dim = cfg["hidden_size"] // heads
                if not cfg.get("use_parallel_residual", True):
                    raise ModelLoadError("GPT-NeoX with use_parallel_residual=false "
                                         "is not supported")
                act = cfg.get("hidden_act", "gelu")
                if act != "gelu":
                    raise ModelLoadError(f"GPT-NeoX hidden_act {act!r} is not supported "
                                         "(only 'gelu')")
                rope = cfg.get("rope_parameters") or {}
                rotary_pct = cfg.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
                theta = cfg.get("rotary_emb_base", rope.get("rope_theta", 10000.0))
                spec = cls(
                    family="gpt_neox",
                    vocab_size=cfg["vocab_size"],
                    hidden_size=cfg["hidden_size"],
                    num_layers=cfg["num_hidden_layers"],
                    num_heads=heads,
                    num_kv_heads=heads,
                    intermediate_size=cfg["intermediate_size"],
                    rotary_dim=int(head_dim * rotary_pct),
                    rope_theta=float(theta),
                    norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                    max_position=cfg.get("max_position_embeddings", 2048),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    bos_token_id=cfg.get("bos_token_id"),
                    eos_token_id=cfg.get("eos_token_id"),
                )
            elif model_type == "llama":
                heads = cfg["num_attention_heads"]
                head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
                if head_dim * heads != cfg["hidden_size"]:
                    raise ModelLoadError("Llama configs with head_dim * heads != hidden_size "
                                         "are not supported")
                act = cfg.get("hidden_act", "silu")
                if act != "silu":
                    raise ModelLoadError(f"Llama hidden_act {act!r} is not supported (only 'silu')")
                rope = cfg.get("rope_parameters") or {}
                scaling = cfg.get("rope_scaling") or {}
                kind = (scaling.get("rope_type", scaling.get("type"))
                        or rope.get("rope_type", "default"))
                if kind not in (None, "default"):
                    raise ModelLoadError(f"rope scaling {kind!r} is not supported")
                theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
                spec = cls(
                    family="llama",
                    vocab_size=cfg["vocab_size"],
                    hidden_size=cfg["hidden_size"],
                    num_layers=cfg["num_hidden_layers"],
                    num_heads=heads,
                    num_kv_heads=cfg.get("num_key_value_heads") or heads,
                    intermediate_size=cfg["intermediate_size"],
                    rotary_dim=head_dim,
                    rope_theta=float(theta),
                    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                    max_position=cfg.get("max_position_embeddings", 2048),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    bos_token_id=cfg.get("bos_token_id"),
                    eos_token_id=cfg.get("eos_token_id"),
                )
            else:
                raise ModelLoadError(
                    f"model_type {model_type!r} is not supported (supported: gpt_neox, llama)")
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the key {e.args[0]!r}") from None
        return spec.validate()
