"""Expert checkpoints: PEFT adapter safetensors plus JSON metadata, written atomically.

Layout under a node's output directory::

    checkpoints/gen-000001-step-00000120/adapter_model.safetensors   (PEFT, safetensors only — never pickle)
    checkpoints/gen-000001-step-00000120/adapter_config.json
    checkpoints/gen-000001-step-00000120/cogen.json   (AdapterMetadata: version, lineage, sha256)
    latest -> checkpoints/gen-000001-step-00000120    (symlink, swapped atomically)

Names carry the generation of the base the expert was trained on, and old checkpoints are pruned only
within their generation: the last expert of every generation stays.

A checkpoint is written into a temporary directory, fsynced and renamed into place before ``latest``
moves to it (:mod:`cogen.core.atomic`), so a crash at any moment leaves the previous checkpoint intact
and ``latest`` valid.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogen.core.atomic import swap_symlink, write_dir_atomic
from cogen.core.exit_codes import CommandError, ExitCode
from cogen.protocols.hashing import sha256_file, sha256_tree
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


def save_adapter(model: Any, out_dir: Path, metadata: AdapterMetadata, keep: int = 3) -> Path:
    """Save ``model``'s adapter (a PEFT model) as a new checkpoint and point ``latest`` at it."""

    def write(tmp: Path) -> None:
        # the adapter only: an adapted, tied lm_head must not drag the base's embedding matrix along
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
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
        files = sha256_tree(tmp)
        meta = metadata.model_copy(update={"files": files})
        (tmp / METADATA_FILE).write_text(meta.model_dump_json(indent=2))

    write_dir_atomic(final, write_all, replace=True)
    swap_symlink(Path(out_dir) / "latest", final)
    prune_dirs(ckpt_root, f"{prefix}*", keep, final)
    return final


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
