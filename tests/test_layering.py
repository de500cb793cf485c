"""The package's import graph respects the layering, and has no cycle.

Layers, lowest first (a module may import its own layer and those below, never above):

0. ``config``, ``errors`` (and small leaf helpers such as an atomic-write module)
1. ``models.*`` (spec, weights, transformer, presets, tokenizer, families), ``rope``,
   ``cache``, ``attention``, ``kernels`` (leaf Triton kernels), ``reference`` (the slow
   oracles: they need only the model, the rotary tables and the caches)
2. ``quant``; the model *loader* (``fastdecode.models`` itself, the package's
   ``__init__``: it builds quantized models from checkpoints, so it sits beside quant);
   ``registry`` (it reads ``config`` and ``quant``)
3. ``engine``
4. ``fused``, ``compile``
5. ``eval``, ``bench`` (5.5: ``study``, which runs both)
6. ``commands``, ``cli``, ``__main__``

Every ``import`` and ``from ... import`` counts, at module level or inside a function,
relative or absolute. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module of the package, else to ``pkg``. Importing ``a.b`` is not counted as importing
``a``'s ``__init__`` (Python runs it, but that is the package's business, not an edge a
module chose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "fastdecode"
PKG = "fastdecode"

# (prefix, layer): the longest matching prefix wins; "=name" matches that module only.
LAYERS = [
    ("config", 0), ("errors", 0), ("io", 0), ("atomic", 0),
    ("models", 1), ("=models", 2), ("rope", 1), ("cache", 1), ("attention", 1),
    ("kernels", 1), ("reference", 1),
    ("quant", 2), ("registry", 2),
    ("engine", 3),
    ("fused", 4), ("compile", 4),
    ("eval", 5), ("bench", 5),
    ("study", 5.5),  # the study: over eval and bench, under the commands
    ("commands", 6), ("cli", 6), ("__main__", 6),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


def layer_of(module: str) -> int | None:
    """The layer of a module (``fastdecode.x.y``), None for the top-level package."""
    rel = module[len(PKG) + 1:] if module != PKG else ""
    if not rel:
        return None
    best, best_len = None, -1
    for prefix, layer in LAYERS:
        if prefix.startswith("="):
            if rel == prefix[1:] and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
        elif (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = layer, len(prefix)
    return best


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    out = set()

    def add(target: str, names: list[str]):
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        out.update(subs)
        if len(subs) < len(names) or not names:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PKG or target.startswith(PKG + "."):
                add(target, [a.name for a in node.names])
    out.discard(module)
    return {m for m in out if m in known or m == PKG}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != PKG and layer_of(m) is None]
    assert not unplaced, f"place these modules in tests/test_layering.py's LAYERS: {unplaced}"


def test_the_walker_sees_relative_function_level_and_from_imports(tmp_path):
    src = ("from ..cache import base\nfrom . import spec\n"
           "def f():\n    from ..quant.int4 import Int4Linear\n    import fastdecode.engine\n")
    p = tmp_path / "transformer.py"
    p.write_text(src)
    known = {"fastdecode.cache", "fastdecode.cache.base", "fastdecode.models",
             "fastdecode.models.spec", "fastdecode.quant.int4", "fastdecode.engine"}
    got = imports_of("fastdecode.models.transformer", p, known)
    assert got == {"fastdecode.cache.base", "fastdecode.models.spec",
                   "fastdecode.quant.int4", "fastdecode.engine"}
    assert layer_of("fastdecode.models") == 2 and layer_of("fastdecode.models.spec") == 1
    assert layer_of("fastdecode.fused.step") == 4 and layer_of("fastdecode.registry") == 2


def test_no_module_imports_a_higher_layer():
    bad = []
    for mod, targets in graph().items():
        lm = layer_of(mod)
        for t in sorted(targets):
            lt = layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} (layer {lm}) imports {t} (layer {lt})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    found = _cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found or [])


@pytest.mark.parametrize("name", ["compile", "fused", "engine", "eval", "bench", "commands"])
def test_lower_layers_do_not_import(name):
    """Spelled out for the edges the issue named: the model, attention and quant layers
    import none of these."""
    for mod, targets in graph().items():
        if layer_of(mod) is not None and layer_of(mod) <= 2:
            hit = [t for t in targets if t == f"{PKG}.{name}" or t.startswith(f"{PKG}.{name}.")]
            assert not hit, f"{mod} imports {hit}"
