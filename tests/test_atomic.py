"""Atomic directory writes and file hashes: one helper each (:mod:`cogen.core.atomic`,
:mod:`cogen.protocols.hashing`), used by checkpoints, states, models, fetches, publishes and mixtures."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cogen.core import atomic
from cogen.core.atomic import commit_dir, remove_stale_staging, staging_dir, write_dir_atomic
from cogen.core.procs import wait_for
from cogen.protocols.hashing import sha256_file, sha256_tree


def _age(*paths: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for p in paths:
        os.utime(p, (old, old))


def _fill(version: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / "a.txt").write_text(version)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(version)

    return write


def _content(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): p.read_text() for p in directory.rglob("*") if p.is_file()}


def test_a_killed_writer_leaves_nothing_visible_and_the_next_write_removes_leftovers(
    tmp_path: Path,
) -> None:
    final, started = tmp_path / "out" / "thing", tmp_path / "started"
    code = (
        "import sys, time; from pathlib import Path; from cogen.core.atomic import write_dir_atomic\n"
        "def write(tmp):\n"
        "    (tmp / 'half.bin').write_bytes(b'x' * 1000)\n"
        "    Path(sys.argv[2]).touch()\n"
        "    time.sleep(600)\n"
        "write_dir_atomic(Path(sys.argv[1]), write)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(final), str(started)])
    try:
        wait_for(started.exists, 60, "the child is half-way through its write", alive=[child])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert not final.exists()  # nothing half-written is visible under the final name
    (leftover,) = final.parent.iterdir()
    assert leftover.name.startswith(".thing-") and leftover.name.endswith(".staging")
    assert (leftover / "half.bin").is_file()  # SIGKILL ran no cleanup
    assert remove_stale_staging(final.parent) == []  # too young: its writer may not have locked it yet
    _age(leftover)
    write_dir_atomic(final, _fill("v1"))
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # the leftover is gone
    assert _content(final) == {"a.txt": "v1", "sub/b.txt": "v1"}
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # readable by others (mkdtemp made it private)


def test_a_failing_write_leaves_no_directory_and_no_staging(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomic(tmp_path / "thing", write)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_is_refused_unless_replace_is_asked(tmp_path: Path) -> None:
    final = write_dir_atomic(tmp_path / "thing", _fill("old"))
    with pytest.raises(FileExistsError, match="already exists"):
        write_dir_atomic(final, _fill("new"))
    assert _content(final) == {"a.txt": "old", "sub/b.txt": "old"}  # untouched
    before = final.stat().st_ino
    write_dir_atomic(final, _fill("new"), replace=True)
    assert _content(final) == {"a.txt": "new", "sub/b.txt": "new"} and final.stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # the old copy is removed, no staging
    (tmp_path / "empty").mkdir()  # an empty directory is taken over, as rename(2) does
    assert _content(write_dir_atomic(tmp_path / "empty", _fill("v"))) == {"a.txt": "v", "sub/b.txt": "v"}


def test_replace_without_an_atomic_exchange_moves_the_old_copy_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a kernel or filesystem without renameat2
    final = write_dir_atomic(tmp_path / "thing", _fill("old"))
    write_dir_atomic(final, _fill("new"), replace=True)
    assert _content(final) == {"a.txt": "new", "sub/b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_an_atomic_exchange_swaps_two_directories_where_linux_offers_it(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic._exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_directory_a_live_process_is_building_is_kept(tmp_path: Path) -> None:
    with staging_dir(tmp_path, "live") as live:
        dead = tmp_path / ".dead-k1ll3d.staging"
        other = tmp_path / ".git"  # not a staging directory: never touched, whatever its age
        dead.mkdir()
        other.mkdir()
        _age(live, dead, other)
        assert remove_stale_staging(tmp_path) == [dead]
        other.rmdir()
        assert live.is_dir()
        (live / "f").write_text("done")
        commit_dir(live, tmp_path / "live")
    assert _content(tmp_path / "live") == {"f": "done"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]


def test_file_hashes_are_sha256_of_every_file_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    files = {"top.bin": os.urandom(3000), "nested/deeper/x": b"", "listing.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert sha256_file(tmp_path / "top.bin", chunk=7) == expected["top.bin"]  # chunking changes nothing
    assert sha256_tree(tmp_path) == dict(sorted(expected.items()))
    assert list(sha256_tree(tmp_path)) == sorted(expected)
    del expected["listing.json"]
    assert sha256_tree(tmp_path, exclude={"listing.json"}) == expected  # a listing never hashes itself


def test_a_private_file_is_created_once_with_mode_0600_and_the_first_creator_wins(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "id.pem"
    assert atomic.create_private_once(path, lambda tmp: tmp.write_text("first"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "first"
    assert not atomic.create_private_once(path, lambda tmp: tmp.write_text("second"))
    assert path.read_text() == "first"  # never overwritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["id.pem"]  # no private temp dir left
