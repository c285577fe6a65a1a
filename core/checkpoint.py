"""Expert checkpoints: PEFT adapter safetensors plus JSON metadata, written atomically.

Layout under a node's output directory::

    checkpoints/gen-000001-step-00000120/adapter_model.safetensors   (PEFT, safetensors only — never pickle)
    checkpoints/gen-000001-step-00000120/adapter_config.json
    checkpoints/gen-000001-step-00000120/cogen.json   (AdapterMetadata: version, lineage, sha256)
    latest -> checkpoints/gen-000001-step-00000120    (symlink, swapped atomically)

Names carry the generation of the base the expert was trained on, and old checkpoints are pruned only
within their generation: the last expert of every generation stays.

A checkpoint is written into a temporary directory, fsynced and renamed into place before ``latest``
moves to it, so a crash at any moment leaves the previous checkpoint intact and ``latest`` valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogen.core.exit_codes import CommandError, ExitCode
from cogen.protocols.manifest import sha256_file
from cogen.protocols.version import software_version

METADATA_FILE = "cogen.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA_VERSION = 2


class CheckpointError(RuntimeError, CommandError):
    """A checkpoint is missing, unreadable or corrupt (one-line explanation)."""

    exit_code = ExitCode.DATA
    what = "checkpoint"


class AdapterMetadata(BaseModel):
    """What a saved expert adapter is: its lineage, training so far and file hashes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metadata_version: int = METADATA_VERSION
    expert: str
    base_model: str = Field(description="the model name the adapter was trained on")
    precision: str
    generation: int = Field(default=0, ge=0, description="the generation of the base it was trained on")
    steps: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    train_loss: float | None = None
    first_loss: float | None = Field(default=None, description="the first training loss reported")
    outer_step: int | None = Field(default=None, description="the group's outer step the weights belong to")
    created_at: float = Field(default_factory=time.time)
    software_version: str = Field(default_factory=software_version)
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring metadata written by older cogen versions up to :data:`METADATA_VERSION`."""
    version = raw.get("metadata_version", 0)
    if not isinstance(version, int) or version > METADATA_VERSION:
        raise CheckpointError(f"checkpoint metadata version {version!r} is newer than this cogen understands")
    if version == 0:  # pre-release checkpoints called it "loss" and had no hashes
        raw = dict(raw)
        raw["train_loss"] = raw.pop("loss", None)
        raw.setdefault("files", {})
        raw["metadata_version"] = 1
    if raw["metadata_version"] == 1:  # v1 had no generation: a published base's directory names it
        raw = dict(raw)
        found = re.search(r"gen-(\d{6})-", str(raw.get("base_model", "")))
        raw["generation"] = int(found.group(1)) if found else 0
        raw["metadata_version"] = 2
    return raw


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: Any, out_dir: Path, metadata: AdapterMetadata, keep: int = 3) -> Path:
    """Save ``model``'s adapter (a PEFT model) as a new checkpoint and point ``latest`` at it."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)

    return _write_checkpoint(out_dir, metadata, write, keep)


def save_adapter_tensors(
    tensors: dict[str, Any], adapter_config: dict[str, Any], out_dir: Path, metadata: AdapterMetadata
) -> Path:
    """Save LoRA tensors (PEFT's saved names, e.g. ``base_model.model.<module>.lora_A.weight``) and their
    ``adapter_config.json`` as a checkpoint, exactly as :func:`save_adapter` lays one out."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))

    return _write_checkpoint(out_dir, metadata, write, keep=1)


def _write_checkpoint(
    out_dir: Path, metadata: AdapterMetadata, write: Callable[[Path], None], keep: int
) -> Path:
    """Write a checkpoint into a temp dir (``write``), hash and fsync it, rename it into place, swap
    ``latest`` and prune old ones: a crash leaves ``latest`` on the previous complete checkpoint."""
    ckpt_root = Path(out_dir) / "checkpoints"
    prefix = f"gen-{metadata.generation:06d}-step-"
    final = ckpt_root / f"{prefix}{metadata.steps:08d}"

    def write_all(tmp: Path) -> None:
        write(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = metadata.model_copy(update={"files": files})
        (tmp / METADATA_FILE).write_text(meta.model_dump_json(indent=2))

    write_dir_atomic(final, write_all)
    swap_symlink(Path(out_dir) / "latest", final)
    prune_dirs(ckpt_root, f"{prefix}*", keep, final)
    return final


def write_dir_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory of ``final`` (``write``), fsync its files and rename it to
    ``final``: readers see no directory or a complete one, never a half-written one."""
    with staging_dir(final.parent, final.name) as tmp:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        commit_dir(tmp, final)
    return final


def swap_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relative), atomically: readers see the old or the new target."""
    link_tmp = link.parent / f".{link.name}-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link_tmp)
    os.replace(link_tmp, link)
    fsync_dir(link.parent)


def prune_dirs(root: Path, pattern: str, keep: int, current: Path, marker: str = METADATA_FILE) -> None:
    """Delete all but the ``keep`` last (by name) complete directories (holding ``marker``) of ``root``
    that match ``pattern``; never ``current``."""
    done = sorted(p for p in root.glob(pattern) if (p / marker).exists())
    for old in done[: max(0, len(done) - keep)]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or ``None`` if nothing was saved yet."""
    link = Path(out_dir) / "latest"
    return link.resolve() if link.exists() else None


def read_metadata(ckpt: Path, verify: bool = True) -> AdapterMetadata:
    """Read (and upgrade) a checkpoint's metadata; with ``verify``, check every file's sha256."""
    path = Path(ckpt) / METADATA_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a cogen checkpoint (no {METADATA_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    try:
        meta = AdapterMetadata.model_validate(_upgrade(raw))
    except ValidationError as e:
        raise CheckpointError(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    if verify:
        if ADAPTER_WEIGHTS not in meta.files:
            raise CheckpointError(f"{ckpt}: metadata lists no {ADAPTER_WEIGHTS}")
        for name, digest in meta.files.items():
            file = Path(ckpt) / name
            if not file.is_file() or sha256_file(file) != digest:
                raise CheckpointError(f"{file} is missing or does not match its sha256 in {METADATA_FILE}")
    return meta


def load_adapter(base: Any, ckpt: Path, trainable: bool = False) -> Any:
    """Attach a verified checkpoint's adapter to ``base`` (a transformers model); returns a PeftModel."""
    from peft import PeftModel

    read_metadata(ckpt, verify=True)
    return PeftModel.from_pretrained(base, str(ckpt), is_trainable=trainable)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
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


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A hidden temporary directory ``parent/.name-XXXX`` to build a directory in, then :func:`commit_dir`.

    It is removed when the block exits in any way (an exception, KeyboardInterrupt, SystemExit) unless it
    was committed; while the block runs it holds an ``flock``, so :func:`remove_stale_staging` can tell
    the leftovers of a killed process from a directory another process is still building.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def commit_dir(tmp: Path, final: Path) -> None:
    """fsync every file of ``tmp``, make it world-readable and rename it to ``final`` (which must not
    exist, or be an empty directory): readers see nothing or the whole directory."""
    for p in Path(tmp).rglob("*"):
        if p.is_file():
            with open(p, "rb") as handle:
                os.fsync(handle.fileno())
    Path(tmp).chmod(0o755)  # mkdtemp made it private
    os.rename(tmp, final)
    fsync_dir(Path(final).parent)


def remove_stale_staging(parent: Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove the staging directories under ``parent`` that no live process holds (left by a kill);
    returns them. One younger than ``min_age_s`` is spared: its creator may not have locked it yet."""
    removed = []
    for p in sorted(Path(parent).glob(".*")) if Path(parent).is_dir() else []:
        if not p.is_dir() or p.is_symlink() or time.time() - p.stat().st_mtime < min_age_s:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live download
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed
