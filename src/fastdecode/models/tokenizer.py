"""A small tokenizer wrapper over the ``tokenizers`` library (tokenizer.json files)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError


class Tokenizer:
    def __init__(self, backend, eos_token_id: int | None = None, bos_token_id: int | None = None):
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    @classmethod
    def from_file(cls, path: str | Path, eos_token_id=None, bos_token_id=None) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON
            raise ModelLoadError(f"cannot read tokenizer {path}: {e}") from None
        return cls(backend, eos_token_id, bos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)
