"""Model families, one file each, chosen by the Hugging Face ``model_type``; a third family is
one :class:`~.base.Family` subclass, its entry in ``_FAMILIES`` and its tests.
"""

from __future__ import annotations

from ...errors import ModelLoadError
from .base import MLPS, NORMS, Family
from .gpt_neox import GPTNeoX
from .llama import Llama

_FAMILIES = (GPTNeoX(), Llama())
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


def get(model_type) -> Family:
    """The family of a Hugging Face ``model_type`` (also ``ModelSpec.family``)."""
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ModelLoadError(f"model_type {model_type!r} is not supported (supported: "
                             f"{', '.join(FAMILIES)})") from None


def for_gguf(arch) -> Family:
    """The family of a GGUF ``general.architecture``."""
    for fam in FAMILIES.values():
        if fam.gguf_arch is not None and fam.gguf_arch == arch:
            return fam
    known = [f.gguf_arch for f in FAMILIES.values() if f.gguf_arch]
    raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only "
                         f"{', '.join(known)})")


__all__ = ["FAMILIES", "Family", "NORMS", "MLPS", "get", "for_gguf", "GPTNeoX", "Llama"]
