"""Every registered cache policy, driven by the registry (``fastdecode.cache.POLICIES``):
its config validates each option (naming the policy and the field), refuses options it
does not have, round-trips through ``to_dict``, states consistent facts, builds its cache;
and the CLI's ``--policy`` choices and cache flags are the registry's."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields, replace

import pytest

from fastdecode import cache as cache_mod
from fastdecode.cache import POLICIES, CacheConfig, KVCache, PolicyConfig, make_cache, option
from fastdecode.cache.window import WindowCache
from fastdecode.cli import build_parser, main
from fastdecode.commands.common import cache_config
from fastdecode.errors import ConfigError
from fastdecode.models.presets import SHAPE_PRESETS

NAMES = sorted(POLICIES)
SHARED = {f.name for f in fields(PolicyConfig)}


def small(cls: type[PolicyConfig]) -> PolicyConfig:
    """The policy's defaults with every integer option shrunk to a few tokens (sinks to
    one: a budget that includes the sinks must exceed them)."""
    over = {f.name: max(f.metadata.get("min") or 0, 1) + (0 if f.name == "sink" else 2)
            for f in fields(cls) if type(f.default) is int}
    return cls(**over)


def int_options(cls) -> list:
    return [f for f in fields(cls) if type(f.default) is int]


# -------------------------------------------------------------------------- the registry
def test_registry_is_built_from_the_classes():
    assert {"dense", "window", "streaming"} <= set(POLICIES)
    for name, cls in POLICIES.items():
        assert cls.policy == name
        assert issubclass(cls, PolicyConfig) and cls.__dataclass_params__.frozen
        assert callable(getattr(cls.cache_class, "plan_decode", None))
        # The policy's own options come first, the shared ones last.
        assert set(cls.options()[-len(SHARED):]) == SHARED


@pytest.mark.parametrize("name", NAMES)
def test_defaults_facts_and_round_trip(name):
    cls = POLICIES[name]
    for cfg in (cls(), small(cls), CacheConfig(policy=name)):
        d = cfg.to_dict()
        assert d["policy"] == name and set(d) == {"policy", *cls.options()}
        assert CacheConfig(**d) == cfg  # what records store rebuilds the config
        assert 0 <= cfg.sink <= cfg.budget <= cfg.max_held
        assert cfg.max_held == cfg.budget + cfg.compress_every - 1
        assert cfg.max_tokens is None or cfg.max_tokens >= cfg.max_held
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().position_mode = "absolute"


@pytest.mark.parametrize("name", NAMES)
def test_cache_built_from_config(name):
    cfg = small(POLICIES[name])
    cache = make_cache(cfg, SHAPE_PRESETS["tiny-llama"]())
    assert isinstance(cache, cfg.cache_class)
    assert cache.cfg is cfg and cache.name == name
    assert cache.max_held() == cfg.max_held and cache.sink == cfg.sink


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", NAMES)
def test_bad_budgets_name_the_policy_and_field(name):
    cls = POLICIES[name]
    checked = 0
    for f in int_options(cls):
        low = f.metadata.get("min")
        if low is not None:
            with pytest.raises(ConfigError, match=rf"^{name} cache: {f.name} must be >= "
                                                  rf"{low}, got {low - 1}$"):
                CacheConfig(policy=name, **{f.name: low - 1})
            checked += 1
        for bad in (2.5, "3", True):
            with pytest.raises(ConfigError, match=rf"{name} cache: {f.name} must be an "
                                                  rf"integer, got {re.escape(repr(bad))}"):
                CacheConfig(policy=name, **{f.name: bad})
    assert checked == sum(f.metadata.get("min") is not None for f in int_options(cls))
    with pytest.raises(ConfigError, match=rf"{name} cache: position mode 'relative' is not "
                                          r"one of \('cache', 'absolute'\)"):
        CacheConfig(policy=name, position_mode="relative")
    with pytest.raises(ConfigError, match=rf"{name} cache: kv_dtype 'int4' is not one of"):
        CacheConfig(policy=name, kv_dtype="int4")
    with pytest.raises(ConfigError, match="must be >= "):  # replace() validates too
        replace(small(cls), **{int_options(cls)[0].name: -5})


@pytest.mark.parametrize("name", NAMES)
def test_foreign_options_are_refused_naming_the_policy(name):
    """An option only other policies have is an error naming this policy, unless it is
    one of this policy's read-only facts given at its value (``sink=0`` for a window)."""
    cls = POLICIES[name]
    foreign = {f.name: f for other in POLICIES.values() for f in fields(other)
               if f.name not in cls.options()}
    assert foreign or len(POLICIES) == 1
    for opt, f in foreign.items():
        fact = getattr(cls(), opt, None)
        if isinstance(fact, int):
            assert CacheConfig(policy=name, **{opt: fact}) == cls()
            bad = fact + 3
        else:
            bad = f.default
        with pytest.raises(ConfigError, match=rf"the {name} policy "):
            CacheConfig(policy=name, **{opt: bad})
    with pytest.raises(ConfigError, match=rf"the {name} policy has no option 'bogus' \(its "
                                          rf"options: {', '.join(cls.options())}\)"):
        CacheConfig(policy=name, bogus=1)


def test_named_foreign_options():
    with pytest.raises(ConfigError, match="the streaming policy has no option 'max_len'"):
        CacheConfig(policy="streaming", sink=4, window=8, max_len=64)
    with pytest.raises(ConfigError, match="the window policy keeps no sinks"):
        CacheConfig(policy="window", sink=4, window=8)
    with pytest.raises(ConfigError, match="the dense policy has no option 'window'"):
        CacheConfig(policy="dense", window=8)
    assert CacheConfig(policy="dense", sink=0, max_len=9) == POLICIES["dense"](max_len=9)


def test_unknown_policy_lists_the_registry():
    with pytest.raises(ConfigError) as info:
        CacheConfig(policy="nope")
    assert str(info.value) == f"cache policy 'nope' is not one of {tuple(POLICIES)}"


# ---------------------------------------------------------------------------------- CLI
def _cache_flags(command: str = "generate") -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_cli_flags_are_the_registry(command):
    acts = _cache_flags(command)
    assert tuple(acts["policy"].choices) == tuple(POLICIES)
    every = {n for cls in POLICIES.values() for n in cls.options()}
    for name in every:
        act = acts[name]
        assert act.option_strings == ["--" + name.replace("_", "-")]
        assert act.default is None  # the policy's own default applies
    for name in SHARED:
        f = {f.name: f for f in fields(PolicyConfig)}[name]
        assert tuple(acts[name].choices) == f.metadata["choices"]


def test_cli_unknown_policy_gives_the_registry(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "tiny-neox", "--prompt", "hi", "--policy", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err
    for name in POLICIES:
        assert repr(name) in err


def _args(*argv):
    return build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", *argv])


def test_cli_builds_the_policy_config():
    assert cache_config(_args()) == POLICIES["streaming"]()
    assert cache_config(_args("--policy", "dense", "--max-len", "16")) == \
        POLICIES["dense"](max_len=16)
    assert cache_config(_args("--policy", "window", "--window", "7", "--compress-every",
                              "3", "--kv-dtype", "int8")) == \
        POLICIES["window"](window=7, compress_every=3, kv_dtype="int8")
    assert cache_config(_args("--sink", "2", "--position-mode", "absolute")) == \
        POLICIES["streaming"](sink=2, position_mode="absolute")


@pytest.mark.parametrize(("argv", "expect"), [
    (["--policy", "window", "--sink", "4"], "the window policy keeps no sinks"),
    (["--policy", "streaming", "--max-len", "64"], "the streaming policy has no option"),
    (["--policy", "dense", "--window", "64"], "the dense policy has no option 'window'"),
    (["--policy", "dense", "--max-len", "0"], "dense cache: max_len must be >= 1, got 0"),
])
def test_cli_refuses_options_of_other_policies(argv, expect, capsys):
    """Before loading anything: a flag the chosen policy does not have is an error (it
    used to be silently dropped)."""
    code = main(["generate", "--model", "no/such/model", "--prompt", "hi", *argv])
    assert code == 2
    assert expect in capsys.readouterr().err


# ----------------------------------------------------------------- a new policy, in a test
class _KeepLast(WindowCache):
    """The window cache under another name: a policy that is one class and one entry."""


@dataclass(frozen=True, kw_only=True)
class KeepLastConfig(PolicyConfig):
    policy = "keep-last"
    cache_class = _KeepLast

    keep: int = option(6, "tokens kept", min=2)

    def check(self):
        if self.keep % 2:
            raise self._error(f"keep must be even, got {self.keep}")

    @property
    def window(self) -> int:  # what WindowCache reads
        return self.keep

    @property
    def budget(self) -> int:
        return self.keep


def test_a_registered_policy_reaches_config_cache_and_cli(monkeypatch, capsys):
    monkeypatch.setitem(POLICIES, "keep-last", KeepLastConfig)
    cfg = CacheConfig(policy="keep-last", keep=4)
    assert cfg.to_dict() == {"policy": "keep-last", "keep": 4, "position_mode": "cache",
                             "kv_dtype": "auto"}
    with pytest.raises(ConfigError, match="keep-last cache: keep must be even, got 5"):
        CacheConfig(policy="keep-last", keep=5)
    with pytest.raises(ConfigError, match="keep-last cache: keep must be >= 2, got 0"):
        CacheConfig(policy="keep-last", keep=0)
    cache = make_cache(cfg, SHAPE_PRESETS["tiny-neox"]())
    assert isinstance(cache, KVCache) and cache.held_positions(9) == [5, 6, 7, 8]
    acts = _cache_flags()
    assert "keep-last" in acts["policy"].choices and acts["keep"].default is None
    assert "keep-last" in acts["keep"].help and "default 6" in acts["keep"].help
    assert cache_config(_args("--policy", "keep-last", "--keep", "8")) == \
        KeepLastConfig(keep=8)


def test_one_option_declared_two_ways_is_refused(monkeypatch):
    @dataclass(frozen=True, kw_only=True)
    class Clash(PolicyConfig):
        policy = "clash"
        cache_class = WindowCache
        window: str = option("wide", "not an integer here")

        @property
        def budget(self) -> int:
            return 1

    monkeypatch.setitem(POLICIES, "clash", Clash)
    with pytest.raises(ConfigError, match="option 'window' is declared with different"):
        cache_mod.policy_options()
