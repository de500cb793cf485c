"""The base of every policy's config: the shared options, their validation from each
field's :func:`option` metadata (so the CLI flags and the checks are declared once), and the
read-only facts generic code asks, so no caller special-cases a policy by name."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from ..errors import ConfigError
from .storage import STORAGES

POSITION_MODES = ("cache", "absolute")
KV_DTYPES = tuple(STORAGES)


def option(default, help: str, *, choices: tuple | None = None, min: int | None = None,
           label: str | None = None):
    """A policy option: a dataclass field whose metadata the validator and the CLI read.
    ``label`` is how error messages name it (default: the field name)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min,
                                            "label": label})


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """What a KV cache keeps and how it stores it; one subclass per policy, which sets
    ``policy`` (the registry name) and ``cache_class`` and overrides the facts below."""

    policy: ClassVar[str] = "base"
    cache_class: ClassVar[type]
    # Hints for options a policy does not have, e.g. {"sink": "..."}; see from_options.
    foreign_hints: ClassVar[dict[str, str]] = {}

    position_mode: str = option(
        "cache", "cache: keys and queries at their slots in the cache (StreamingLLM); "
        "absolute: at their positions in the text", choices=POSITION_MODES,
        label="position mode")
    kv_dtype: str = option("auto", "KV storage: the model dtype (auto), or int8 with "
                           "per-head, per-token scales", choices=KV_DTYPES)

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            label = meta.get("label") or f.name
            choices = meta.get("choices")
            if choices is not None:
                if value not in choices:
                    raise self._error(f"{label} {value!r} is not one of {choices}")
                continue
            if isinstance(f.default, int) and not isinstance(f.default, bool):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise self._error(f"{label} must be an integer, got {value!r}")
            low = meta.get("min")
            if low is not None and value < low:
                raise self._error(f"{label} must be >= {low}, got {value}")
        self.check()

    def check(self) -> None:
        """Rules across options; raise ``self._error(...)``. Fields are checked already."""

    def _error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.policy} cache: {message}")

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The option names, the policy's own first."""
        names = [f.name for f in fields(cls)]
        shared = [f.name for f in fields(PolicyConfig)]
        return tuple(n for n in names if n not in shared) + tuple(shared)

    @classmethod
    def from_options(cls, **options) -> PolicyConfig:
        """Build from keyword options, refusing those the policy does not have. A
        read-only fact given at its value (``sink=0`` for a window) is accepted."""
        own = set(cls.options())
        cfg = cls(**{k: v for k, v in options.items() if k in own})
        for name, value in options.items():
            if name in own:
                continue
            fact = getattr(cfg, name, MISSING)
            if fact is not MISSING and not callable(fact) and fact == value:
                continue
            hint = cls.foreign_hints.get(name)
            raise ConfigError(hint.format(value=value) if hint else
                              f"the {cls.policy} policy has no option {name!r} (its "
                              f"options: {', '.join(cls.options())})")
        return cfg

    @property
    def sink(self) -> int:
        """Tokens at the start of the stream that are never evicted."""
        return 0

    @property
    def compress_every(self) -> int:
        """Lazy eviction period: the cache may overrun its budget by up to this minus 1."""
        return 1

    @property
    def budget(self) -> int:
        """Tokens held once the cache is full (before a lazy overrun)."""
        raise NotImplementedError

    @property
    def max_held(self) -> int:
        """The most tokens ever held between steps."""
        return self.budget + self.compress_every - 1

    @property
    def max_tokens(self) -> int | None:
        """The longest stream the cache takes; None when it evicts (any length)."""
        return None

    def to_dict(self) -> dict:
        """What records store: the policy name and every option."""
        return {"policy": self.policy, **{n: getattr(self, n) for n in self.options()}}
