"""What a model family is: its switches and its mappings (Hugging Face config -> spec
fields, checkpoint and GGUF tensor names -> the canonical ones of models/transformer.py),
so the decoder and the loaders never compare family names.
"""

from __future__ import annotations

from ...errors import ModelLoadError

NORMS = ("layer", "rms")  # LayerNorm (weight and bias) | RMSNorm (weight)
MLPS = ("gelu", "glu")  # up -> GELU -> down | up = [gate; up] rows, SiLU(gate) * up -> down


class Family:
    """One architecture family. Subclasses set the class attributes and the mappings."""

    name: str  # the Hugging Face model_type, and ModelSpec.family
    norm: str  # one of NORMS
    mlp: str  # one of MLPS
    parallel_residual: bool  # x + attn(norm1 x) + mlp(norm2 x), else sequential
    bias: bool  # linears (and LayerNorms) carry biases
    gguf_arch: str | None = None  # GGUF general.architecture, None: GGUF not supported

    def spec_fields(self, cfg: dict) -> dict:
        """ModelSpec keyword arguments (all but ``family``) from a config.json dict
        (KeyError: a key config.json lacks)."""
        raise NotImplementedError

    def hf_config(self, spec) -> dict:
        """A config.json dict with ``spec``'s shapes (``spec_fields`` inverts it)."""
        raise NotImplementedError

    def hf_to_canonical(self, spec, hf: dict) -> dict:
        """Canonical state dict from a checkpoint's tensors (KeyError: a tensor missing)."""
        raise NotImplementedError

    def gguf_spec_fields(self, field, tensor_names) -> dict:
        """ModelSpec keyword arguments from GGUF metadata (``field(key, default=None,
        required=False)`` reads a key)."""
        raise ModelLoadError(f"reading {self.name} models from GGUF is not supported")

    def gguf_to_canonical(self, spec, tensors) -> dict:
        """Canonical state dict from GGUF tensors (dequantized, float32)."""
        raise ModelLoadError(f"reading {self.name} models from GGUF is not supported")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def common_hf_fields(cfg: dict) -> dict:
    """The config.json keys every family names alike."""
    return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                num_layers=cfg["num_hidden_layers"], intermediate_size=cfg["intermediate_size"],
                max_position=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


def common_hf_config(spec) -> dict:
    """The inverse of :func:`common_hf_fields`."""
    return dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                intermediate_size=spec.intermediate_size,
                max_position_embeddings=spec.max_position,
                tie_word_embeddings=spec.tie_embeddings, bos_token_id=spec.bos_token_id,
                eos_token_id=spec.eos_token_id)
