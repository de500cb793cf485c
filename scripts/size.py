"""Lines of the package per subpackage, and the baseline's feature set counted like for like.

    python scripts/size.py          (or: nox -s size)

Counts what ``find src/fastdecode -name '*.py' | xargs wc -l`` counts. The ceiling, the
baseline (7366ba4, issue 18) and the modules new since it live in perf/size.toml; later
additions that are not listed there (files added after the list was made) are named too.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "fastdecode"


def load_config() -> dict:
    return tomllib.loads((ROOT / "perf" / "size.toml").read_text())


def line_counts(pkg: Path = PKG) -> dict[str, int]:
    """Module path relative to ``pkg`` -> its number of lines (as ``wc -l``: newlines)."""
    return {p.relative_to(pkg).as_posix(): p.read_bytes().count(b"\n")
            for p in sorted(pkg.rglob("*.py"))}


def baseline_files(commit: str) -> set[str] | None:
    """The package's modules at ``commit`` (None outside a git checkout that has it)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit,
                              "src/fastdecode"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {p.removeprefix("src/fastdecode/") for p in out.stdout.split() if p.endswith(".py")}


def main() -> int:
    cfg, counts = load_config(), line_counts()
    total = sum(counts.values())
    new = set(cfg["new_since_baseline"])
    by_part = Counter()
    for path, n in counts.items():
        by_part[path.split("/")[0].removesuffix(".py")] += n
    print(f"{'subpackage / module':28s} {'lines':>6s}")
    for part, n in sorted(by_part.items(), key=lambda kv: -kv[1]):
        print(f"{part:28s} {n:6d}")
    print(f"{'total':28s} {total:6d}   (ceiling {cfg['ceiling']}, perf/size.toml)")
    print(f"\nnew since {cfg['baseline_commit']} (perf/size.toml new_since_baseline):")
    for path in sorted(new):
        print(f"  {path:26s} {counts.get(path, 0):6d}")
    base = baseline_files(cfg["baseline_commit"])
    unlisted = sorted(set(counts) - new - base) if base is not None else []
    restructured = [p for p in unlisted if p in ("cache/policy.py", "quant/layout.py",
                                                 "fused/options.py", "eval/calibration.py")
                    or p.startswith("models/families/")]
    later = [p for p in unlisted if p not in restructured]
    if later:
        print(f"\nadded since {cfg['baseline_commit']} and not listed (new features? add them "
              "to perf/size.toml):")
        for path in later:
            print(f"  {path:26s} {counts[path]:6d}")
    feature_set = total - sum(counts.get(p, 0) for p in new) - sum(counts[p] for p in later)
    print(f"\nthe {cfg['baseline_commit']} feature set now takes {feature_set} lines "
          f"(was {cfg['baseline_lines']}); all of the package: {total}")
    return 0 if total <= cfg["ceiling"] else 1


if __name__ == "__main__":
    sys.exit(main())
