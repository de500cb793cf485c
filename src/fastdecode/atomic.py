"""Atomic, concurrent-safe output: every file fastdecode writes goes through here, and every
output path a command will write is checked here before any work starts.

A file is written to a unique temporary file beside it, fsynced and ``os.replace``d onto
the target: a reader sees the old file or the new one, and a crash leaves at worst a stray
``.*.tmp``. A directory (a checkpoint) is built beside its target and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:  # read once: os.umask can only be read by setting it
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _temp_name(path: Path) -> tuple[int, str]:
    """A unique temporary file beside ``path`` that keeps its suffixes (writers that pick
    the format from the name see the real one)."""
    suffix = "".join(path.suffixes[-2:]) if path.suffixes else ""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name; on
    success it replaces ``path``, on an error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_name(path)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the writer may not have synced what it wrote
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", what: str = "output",
                **open_kw) -> Iterator:
    """``open(path, mode)`` whose result appears at ``path`` only once the block completes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path, what) as tmp:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    with atomic_open(path, "wb", what) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, what: str = "output") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | os.PathLike, obj, what: str = "record", **dumps_kw) -> Path:
    """``obj`` as JSON at ``path`` (serialised first: nothing written if it cannot be)."""
    dumps_kw.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **dumps_kw) + "\n", what)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, force: bool = False,
               what: str = "output directory") -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target`` that becomes ``target`` when the
    block completes (a non-empty one is replaced only with ``force``, kept whole until the
    new one is in place); on an error ``target`` is untouched."""
    target = Path(target)
    check_output_dir(target, force=force, what=what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                    dir=target.parent))
    except OSError as e:
        raise OutputError(f"cannot write {what} {target}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                        dir=target.parent))
            os.replace(target, old / "d")  # a rename: the old copy stays whole until the end
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / "d", target)
            raise
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {what} {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_parent(path: Path, what: str) -> None:
    """The directory that will hold ``path`` exists or can be created, and is writable."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{what} {path}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: directory {anc} is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse (OutputError) an output file that cannot be written. Creates nothing."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(path)!r} is not a file name")
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        # replace() would succeed in a writable directory, but a read-only file is a
        # user's statement that it is not to be overwritten
        raise OutputError(f"{what} {p} is not writable")
    _check_parent(p, what)
    return p


def check_output_dir(path: str | os.PathLike, *, force: bool = False,
                     protect: tuple = (), what: str = "output directory") -> Path:
    """Refuse an output directory that is a file, unwritable, non-empty (unless ``force``),
    or overlaps one of the ``protect`` paths (the run's sources). Creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise OutputError(f"{what} '' is not a directory name")
    rp = p.resolve()
    for src in (s for s in protect if s is not None):
        rs = Path(src).resolve()
        if _inside(rp, rs):
            raise OutputError(f"{what} {p} is the source {src} or lies inside it; "
                              "choose another directory")
        if _inside(rs, rp):
            raise OutputError(f"{what} {p} contains the source {src}; choose another "
                              "directory")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} exists and is not a directory")
    if p.is_dir() and not force and any(p.iterdir()):
        raise OutputError(f"{what} {p} is not empty (pass --force to replace it)")
    _check_parent(p, what)
    return p


def check_distinct(**paths) -> None:
    """Refuse two outputs that name the same file (``name=path``; None is skipped)."""
    seen: dict[Path, str] = {}
    for name, path in ((n, p) for n, p in paths.items() if p is not None):
        rp = Path(path).resolve()
        if rp in seen:
            raise OutputError(f"{seen[rp]} and {name} are the same file {path}; one would "
                              "overwrite the other")
        seen[rp] = name


__all__ = ["atomic_dir", "atomic_open", "atomic_path", "check_distinct", "check_output_dir",
           "check_output_file", "fsync_dir", "write_bytes", "write_json", "write_text"]
