"""fastdecode.atomic: whole-file replacement that concurrent writers and readers can share,
directories renamed into place, and the output-path checks commands run before any work."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import time

import pytest

from fastdecode import atomic
from fastdecode.errors import OutputError


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_json_replaces_whole_and_leaves_nothing_behind(tmp_path):
    p = tmp_path / "sub" / "rec.json"
    atomic.write_json(p, {"a": 1})  # creates the parent
    assert json.loads(p.read_text()) == {"a": 1}
    atomic.write_json(p, {"a": 2, "b": [1, 2]})
    assert json.loads(p.read_text()) == {"a": 2, "b": [1, 2]}
    assert leftovers(p.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "rec.json"
    atomic.write_json(p, {"ok": True})
    with pytest.raises(ValueError):  # NaN refused while serialising: nothing written
        atomic.write_json(p, {"x": float("nan")}, allow_nan=False)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_open(p, "w") as f:
            f.write('{"partial": ')
            raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == []


def test_os_errors_become_one_line_output_errors(tmp_path, monkeypatch):
    p = tmp_path / "rec.json"
    atomic.write_json(p, {"ok": True})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(OutputError, match=r"cannot write record .*rec\.json: No space left"):
        atomic.write_json(p, {"new": 1})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == []


def test_atomic_path_keeps_the_suffix(tmp_path):
    seen = []
    with atomic.atomic_path(tmp_path / "trace.json.gz") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert seen[0].endswith(".json.gz") and seen[0] != "trace.json.gz"
    assert (tmp_path / "trace.json.gz").read_bytes() == b"x"


# ----------------------------------------------------------------------- concurrency
PAYLOAD = 2000  # list items per record: large enough that a write is not one syscall


def _writer(path: str, wid: int, n: int) -> None:
    for i in range(n):
        atomic.write_json(path, {"writer": wid, "i": i, "data": [wid] * PAYLOAD})


def test_concurrent_writers_and_a_reader(tmp_path):
    """Several processes rewrite one record while this one reads it in a loop: every read
    parses as one complete record, and no writer fails (a shared ``<path>.tmp`` failed
    both ways: FileNotFoundError in a writer, partial JSON for the reader)."""
    path = tmp_path / "rec.json"
    atomic.write_json(path, {"writer": -1, "i": -1, "data": []})
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    writers = [ctx.Process(target=_writer, args=(str(path), w, 100)) for w in range(4)]
    for w in writers:
        w.start()
    reads, seen = 0, set()
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        rec = json.loads(path.read_text())  # raises on a partial file
        assert rec["data"] == [rec["writer"]] * (PAYLOAD if rec["writer"] >= 0 else 0)
        seen.add(rec["writer"])
        reads += 1
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    assert reads > 10 and len(seen - {-1}) >= 2  # the reader really overlapped the writers
    final = json.loads(path.read_text())
    assert final["i"] == 99 and final["data"] == [final["writer"]] * PAYLOAD
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------- directories
def test_atomic_dir_builds_beside_and_renames(tmp_path):
    target = tmp_path / "ckpt"
    with atomic.atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(OutputError, match="is not empty .*--force"):
        with atomic.atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):  # an interrupted write leaves the old directory
        with atomic.atomic_dir(target, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic.atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------- checks
def test_check_output_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    (tmp_path / "d").mkdir()
    ok = tmp_path / "new" / "deeper" / "x.json"
    assert atomic.check_output_file(ok) == ok and not (tmp_path / "new").exists()  # no side effects
    with pytest.raises(OutputError, match=r"d is a directory, not a file"):
        atomic.check_output_file(tmp_path / "d")
    with pytest.raises(OutputError, match=r"f is a file, not a directory"):
        atomic.check_output_file(tmp_path / "f" / "x.json")
    with pytest.raises(OutputError, match="not a file name"):
        atomic.check_output_file("")
    assert (tmp_path / "f").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_file_unwritable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            atomic.check_output_file(ro / "x.json")
    finally:
        ro.chmod(0o755)


def test_check_output_file_unwritable_any_user(tmp_path, monkeypatch):
    """The same refusal where the test runs as root (access() is faked)."""
    real = os.access
    monkeypatch.setattr(atomic.os, "access",
                        lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(OutputError, match=f"directory {tmp_path} is not writable"):
        atomic.check_output_file(tmp_path / "new" / "x.json")


def test_check_output_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "y").write_text("y")
    for out, msg in ((src, "is the source"), (src / "sub", "lies inside it"),
                     (tmp_path, "contains the source"), (tmp_path / "file", "not a directory"),
                     (full, "is not empty")):
        with pytest.raises(OutputError, match=msg):
            atomic.check_output_dir(out, protect=(src,))
    with pytest.raises(OutputError, match="is the source"):  # --force does not help
        atomic.check_output_dir(src, force=True, protect=(src,))
    atomic.check_output_dir(full, force=True, protect=(src,))
    atomic.check_output_dir(tmp_path / "new" / "dir", protect=(src,))
    assert (src / "model.safetensors").read_bytes() == b"weights"


def test_check_distinct(tmp_path):
    atomic.check_distinct(a=tmp_path / "x", b=tmp_path / "y", c=None)
    with pytest.raises(OutputError, match="--json and --per-token are the same file"):
        atomic.check_distinct(**{"--json": tmp_path / "x",
                                 "--per-token": tmp_path / "." / "x"})
