"""Publish a merged base: a Hugging Face checkpoint plus its signed manifest, written atomically.

Layout::

    OUT/generations/gen-000001/   model.safetensors, config.json, generation_config.json,
                                  tokenizer files, manifest.json
    OUT/latest -> generations/gen-000001      (symlink, swapped atomically)

A generation is written into a hidden temporary directory next to its final place, every file is
fsynced, the directory is renamed into place (:func:`cogen.core.atomic.write_dir_atomic`), and only
then does ``latest`` move: a crash at any moment leaves ``latest`` on the previous, complete
generation. Published generations are never
overwritten. A restarted coordinator removes what a killed publish left (:func:`remove_stale_temps`)
and reads its generations back (:func:`published_generations`): only those that verify are served.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cogen.coordinator.merging.manifest import Identity, sign_manifest
from cogen.coordinator.merging.registry import MergeError
from cogen.core.atomic import remove_stale_staging, swap_symlink, write_dir_atomic, write_json_atomic
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    file_hashes,
    file_sizes,
    verify_manifest,
)

logger = logging.getLogger(__name__)

GENERATIONS = "generations"
LATEST = "latest"
REJECTED = "rejected"  #: generation dirs that did not verify at start, kept for a person to look at
_GEN_DIR = re.compile(r"^gen-(\d{6,})$")


def generation_dir(out: Path, generation: int) -> Path:
    return Path(out) / GENERATIONS / f"gen-{generation:06d}"


def newest_generation(out: Path) -> int:
    """The highest generation number published under ``out`` (0: none)."""
    root = Path(out) / GENERATIONS
    numbers = [
        int(m.group(1))
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _GEN_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file()
    ]
    return max(numbers, default=0)


def latest_generation(out: Path) -> Path | None:
    """The generation directory ``OUT/latest`` points at, or ``None``."""
    link = Path(out) / LATEST
    return link.resolve() if link.exists() else None


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete what a publish killed half-way left: its hidden temp dirs under ``OUT/generations/``
    and a temp ``latest`` link. Call it only while no publish into ``out`` runs (at start)."""
    out = Path(out)
    removed = remove_stale_staging(out / GENERATIONS, min_age_s=0, pattern=".gen-*")
    for link in sorted(out.glob(f".{LATEST}-*")):
        link.unlink(missing_ok=True)
        removed.append(link)
    return removed


def published_generations(out: Path, trusted_key: str | None) -> list[tuple[Manifest, str, Path]]:
    """Every generation published under ``out`` that verifies, oldest first: (manifest, its sha256, dir).

    A generation dir verifies when its manifest is signed by ``trusted_key``, every file matches its
    sha256 and the manifest's number is the dir's. One that does not is moved to ``OUT/rejected/``
    (never deleted, never served) and reported in one log line; ``latest`` is pointed at the newest
    generation that verifies."""
    out, found = Path(out), []
    root = out / GENERATIONS
    for path in sorted(root.iterdir() if root.is_dir() else []):
        match = _GEN_DIR.match(path.name)
        if match is None or not path.is_dir():
            continue
        try:
            manifest = verify_manifest(path, trusted_key)
            if manifest.generation != int(match.group(1)):
                raise ManifestError(f"its manifest is generation {manifest.generation}")
        except ManifestError as e:
            rejected = out / REJECTED / f"{path.name}-{int(time.time())}"
            rejected.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, rejected)
            logger.warning(
                "generation dir %s does not verify (%s): not served, moved to %s", path, e, rejected
            )
            continue
        found.append((manifest, sha256_file(path / MANIFEST_FILE), path))
    found.sort(key=lambda item: item[0].generation)
    link = out / LATEST
    if found and latest_generation(out) != found[-1][2].resolve():
        swap_symlink(link, found[-1][2])
    elif not found and link.is_symlink():
        link.unlink()
    return found


def parent_info(model_path: str) -> tuple[int, dict[str, str], str | None]:
    """A base's generation, the sha256 of its weight files and of its manifest (when local).

    A base published by cogen (it holds a manifest) must verify: a tampered parent is refused.
    """
    path = Path(model_path)
    if not path.is_dir():
        return 0, {}, None  # a hub id: nothing local to hash
    files = {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
    if not (path / MANIFEST_FILE).is_file():
        return 0, files, None
    return verify_manifest(path).generation, files, sha256_file(path / MANIFEST_FILE)


def publish(
    model: Any,
    tokenizer: Any,
    out: Path,
    manifest: Manifest,
    identity: Identity,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` + ``tokenizer`` and the signed ``manifest`` as generation ``manifest.generation``.

    The manifest's ``files`` and ``sizes`` are filled in here; returns the generation directory.
    """
    out = Path(out)
    final = generation_dir(out, manifest.generation)
    if final.exists():
        raise MergeError(f"generation {manifest.generation} is already published at {final}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)  # more files of this generation (the routed mixture), hashed like the rest
        listed = {"files": file_hashes(tmp), "sizes": file_sizes(tmp)}
        signed = sign_manifest(manifest.model_copy(update=listed), identity)
        write_json_atomic(tmp / MANIFEST_FILE, signed.model_dump(mode="json"))

    write_dir_atomic(final, write)  # a published base is for everyone to read: world-readable
    swap_symlink(out / LATEST, final)
    logger.info("published generation %d at %s", manifest.generation, final)
    return final
