"""Models from the local Hugging Face hub cache (#26, the study's real checkpoints): a
``models--ORG--NAME`` directory or a repo id resolved to its snapshot, offline (nothing is
downloaded); ``hf_cache`` also locates the datasets cache (:mod:`fastdecode.eval.data`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError


def hf_cache(sub: str, variable: str) -> Path:
    """Where Hugging Face keeps ``sub`` (hub, datasets): $variable, else $HF_HOME/sub, else
    $XDG_CACHE_HOME/huggingface/sub, else ~/.cache/huggingface/sub (its own order)."""
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / sub


def hub_cache_dir() -> Path:
    return hf_cache("hub", "HF_HUB_CACHE")


def is_hub_repo_dir(path: Path) -> bool:
    return path.is_dir() and (path / "snapshots").is_dir() and not (path / "config.json").exists()


def hub_snapshot(repo_dir: Path, revision: str | None = None) -> Path:
    """The snapshot of a hub-cache repo directory (``models--ORG--NAME``): ``refs/<revision>``
    (default ``main``) names a commit, or ``revision`` is a commit (or its prefix)."""
    rev = revision or "main"
    snaps = repo_dir / "snapshots"
    have = sorted(p.name for p in snaps.iterdir() if p.is_dir())
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snaps / commit).is_dir():
            return snaps / commit
        raise ModelLoadError(f"{ref} points at commit {commit}, which has no snapshot in "
                             f"{snaps} (have: {', '.join(have) or 'none'})")
    hits = [h for h in have if h.startswith(rev)] if len(rev) >= 7 else []
    if len(hits) == 1:
        return snaps / hits[0]
    refs = sorted(p.name for p in (repo_dir / "refs").glob("*"))  # none if there is no refs/
    raise ModelLoadError(f"{repo_dir}: no snapshot for revision {rev!r} (refs: "
                         f"{', '.join(refs) or 'none'}; snapshots: {', '.join(have) or 'none'}); "
                         "give one with --revision")


def resolve_source(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """(path or name, hub description or None): a hub-cache directory or a repo id found in
    the local hub cache resolved to its snapshot, offline; anything else as it is."""
    path = Path(name).expanduser()
    if is_hub_repo_dir(path):
        snap = hub_snapshot(path, revision)
        repo = path.name.removeprefix("models--").replace("--", "/")
        return str(snap), f"{repo}@{snap.name}"
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        if revision is not None:
            raise ModelLoadError(f"--revision applies to a hub-cache model; {name} is not one")
        return name, None
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + name.replace("/", "--"))
    if not repo_dir.is_dir():
        raise ModelLoadError(f"model {name!r} is not a local path, and the Hugging Face cache "
                             f"has no {repo_dir.name} in {cache} (set HF_HUB_CACHE or HF_HOME; "
                             "nothing is downloaded)")
    snap = hub_snapshot(repo_dir, revision)
    return str(snap), f"{name}@{snap.name}"
