"""Atomic writes: a file, a symlink or a whole directory appears complete or not at all.

One helper per mechanism, used by every writer of cogen's state (adapter checkpoints, resumable
states, model conversions, fetched bases, published generations, routed mixtures):

- :func:`write_dir_atomic` — build a directory in a hidden sibling (:func:`staging_dir`), fsync it and
  rename it into place (:func:`commit_dir`). A reader sees no directory, the old one or the new one,
  never a half-written one. An existing target is refused (``FileExistsError``) unless
  ``replace=True``; then it is swapped for the new one in one ``renameat2(RENAME_EXCHANGE)`` where
  Linux offers it, else moved aside first (for an instant the name is absent, never partial).
- :func:`remove_stale_staging` — what a killed writer left (hidden ``.NAME-XXXX.staging`` siblings no
  live process holds): every staging directory holds an ``flock`` while it is built, so a leftover is
  told from a directory another process is still building; nothing else in the parent is touched.
  :func:`write_dir_atomic` runs it on the parent before each write.
- :func:`write_json_atomic` (a file through a temp file and a rename), :func:`create_private_once` (a
  secret file, mode 0600, created once: the first of concurrent creators wins), :func:`swap_symlink` (a
  link re-pointed in one rename), :func:`fsync_dir` / :func:`fsync_tree` (make renames and files durable).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STALE_AFTER_S = 60.0  #: a staging dir younger than this is spared: its creator may not have locked it yet
STAGING_SUFFIX = ".staging"  #: how a staging directory's name ends (``.NAME-XXXXXXXX.staging``)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``): its content is on disk before a
    rename publishes it."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as handle:
                os.fsync(handle.fileno())
        elif p.is_dir() and not p.is_symlink():
            fsync_dir(p)
    fsync_dir(Path(root))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file (fsynced) and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private_once(path: Path, write: Callable[[Path], object]) -> bool:
    """Create the file ``path`` (mode 0600) by ``write``-ing it at a path it is given, unless it exists.

    It is written inside a fresh private directory next to ``path``, fsynced and hard-linked into place,
    so it is never readable by others nor partial, not even for a moment, and of concurrent creators the
    first wins (the others keep its file). Returns whether this call created it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))  # mode 0700
    try:
        tmp = private / path.name
        write(tmp)
        tmp.chmod(0o600)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        shutil.rmtree(private, ignore_errors=True)


def swap_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relative), atomically: readers see the old or the new target."""
    link_tmp = link.parent / f".{link.name}-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link_tmp)
    os.replace(link_tmp, link)
    fsync_dir(link.parent)


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A hidden temporary directory ``parent/.name-XXXX.staging`` to build a directory in, then
    :func:`commit_dir`.

    It is removed when the block exits in any way (an exception, KeyboardInterrupt, SystemExit) unless it
    was committed; while the block runs it holds an ``flock``, so :func:`remove_stale_staging` can tell
    the leftovers of a killed process from a directory another process is still building.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=STAGING_SUFFIX, dir=parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2``); ``False`` where that is not offered."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel or a filesystem without it
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def commit_dir(tmp: Path, final: Path, replace: bool = False) -> None:
    """fsync ``tmp``, make it world-readable and rename it to ``final``: readers see nothing (or the old
    ``final``) or the whole new directory.

    Without ``replace`` an existing ``final`` is refused with ``FileExistsError`` (an empty directory is
    taken over, as ``rename`` does). With it, the old ``final`` is swapped out in one step where the
    kernel can (it lands at ``tmp``, which the staging block removes), else moved aside just before the
    rename and removed after it."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    tmp.chmod(0o755)  # mkdtemp made it private
    if replace and final.is_dir() and not final.is_symlink():
        if not _exchange(tmp, final):
            aside = (
                final.parent / f".{final.name}-replaced-{os.getpid()}-{time.monotonic_ns()}{STAGING_SUFFIX}"
            )
            os.rename(final, aside)  # a crash here leaves it to remove_stale_staging
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
    elif final.is_symlink() or (final.exists() and not (final.is_dir() and not any(final.iterdir()))):
        raise FileExistsError(errno.EEXIST, f"{final} already exists", str(final))
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def write_dir_atomic(final: Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Fill a staging sibling of ``final`` (``write``), fsync it and rename it to ``final``: readers see
    no directory or a complete one, never a half-written one. What earlier killed writers left in the
    parent is removed first. An existing ``final`` is refused unless ``replace`` (see :func:`commit_dir`)."""
    final = Path(final)
    for stale in remove_stale_staging(final.parent):
        logger.info("removed %s, left by an interrupted write", stale)
    with staging_dir(final.parent, final.name) as tmp:
        write(tmp)
        commit_dir(tmp, final, replace=replace)
    return final


def remove_stale_staging(
    parent: Path, min_age_s: float = STALE_AFTER_S, pattern: str = f".*{STAGING_SUFFIX}"
) -> list[Path]:
    """Remove the staging directories under ``parent`` (hidden, named by ``pattern``) that no live
    process holds (left by a kill); returns them. One younger than ``min_age_s`` is spared: its creator
    may not have locked it yet."""
    removed = []
    for p in sorted(Path(parent).glob(pattern)) if Path(parent).is_dir() else []:
        if not p.is_dir() or p.is_symlink() or time.time() - p.stat().st_mtime < min_age_s:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed
