"""The package stays within the line ceiling of perf/size.toml (issue 18: a lean package).

The count is ``wc -l``'s over src/fastdecode/**/*.py, as scripts/size.py prints it per
subpackage. Raise the ceiling in perf/size.toml deliberately, never to make this pass.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("size_script", ROOT / "scripts" / "size.py")
size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(size)


def test_package_is_within_its_line_ceiling():
    cfg = size.load_config()
    total = sum(size.line_counts().values())
    assert total <= cfg["ceiling"], (
        f"src/fastdecode holds {total} lines, over the ceiling {cfg['ceiling']} of "
        "perf/size.toml: trim (scripts/size.py shows where the lines are) or raise the "
        "ceiling deliberately, saying why")


def test_the_count_is_wc_l(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n\n# c\n")
    (tmp_path / "sub" / "b.py").write_text('"""d"""\ny = 2')  # no final newline: 1, as wc
    (tmp_path / "c.txt").write_text("not python\n")
    assert size.line_counts(tmp_path) == {"a.py": 3, "sub/b.py": 1}


def test_the_listed_new_modules_exist():
    counts = size.line_counts()
    cfg = size.load_config()
    missing = [p for p in cfg["new_since_baseline"] if p not in counts]
    assert not missing, f"perf/size.toml lists modules that do not exist: {missing}"
    assert cfg["baseline_lines"] > 0 and cfg["ceiling"] > cfg["baseline_lines"]


@pytest.mark.skipif(size.baseline_files("7366ba4") is None,
                    reason="needs the git history holding 7366ba4")
def test_listed_new_modules_are_new_since_the_baseline():
    base = size.baseline_files(size.load_config()["baseline_commit"])
    assert not set(size.load_config()["new_since_baseline"]) & base
