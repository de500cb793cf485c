"""Named models: real checkpoints available offline and shape presets for random weights."""

from __future__ import annotations

import json
from importlib import resources

from .spec import ModelSpec

ASSETS = resources.files("fastdecode") / "assets"
NEOX_TOKENIZER = ASSETS / "gpt-neox-20b-tokenizer.json"


def _pythia_2_8b() -> ModelSpec:
    return ModelSpec.from_hf_config(json.loads((ASSETS / "pythia-2.8b-config.json").read_text()))


def _tiny(family: str, **over) -> ModelSpec:
    base = dict(family=family, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=4, intermediate_size=64, rotary_dim=8,
                rope_theta=10000.0, norm_eps=1e-5, max_position=2048, tie_embeddings=False)
    base.update(over)
    return ModelSpec(**base).validate()


_LLAMA_LIKE = dict(num_kv_heads=2, tie_embeddings=True)  # grouped-query, tied head


# Shape presets: random weights only (speed does not depend on values).
SHAPE_PRESETS = {
    "pythia-2.8b": _pythia_2_8b,
    "pythia-160m": lambda: _tiny(
        "gpt_neox", vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12,
        num_kv_heads=12, intermediate_size=3072, rotary_dim=16, bos_token_id=0, eos_token_id=0),
    "tiny-neox": lambda: _tiny("gpt_neox"),
    "tiny-llama": lambda: _tiny("llama", **_LLAMA_LIKE),
    # Wide enough for every int4 group size (in_features a multiple of 256).
    "small-neox": lambda: _tiny("gpt_neox", hidden_size=256, intermediate_size=512,
                                num_heads=8, num_kv_heads=8, rotary_dim=8),
    "small-llama": lambda: _tiny("llama", **_LLAMA_LIKE, hidden_size=256,
                                 intermediate_size=512, num_heads=8, rotary_dim=32),
}

# The presets that come with a tokenizer (the rest have toy vocabularies).
PRESET_TOKENIZERS = {"pythia-2.8b": NEOX_TOKENIZER, "pythia-160m": NEOX_TOKENIZER}

# Real weights available offline.
REAL_MODELS = ("smollm2-135m",)

ALL_NAMES = tuple(SHAPE_PRESETS) + REAL_MODELS
