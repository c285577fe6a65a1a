"""File hashes: the sha256 of one file, and of every file of a directory.

What a signed manifest, an adapter checkpoint's metadata and a mixture's ``mixture.json`` list, and what
a fetched or loaded directory is checked against. It lives in ``protocols`` because a manifest's
verification needs it and ``protocols`` imports nothing else of cogen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path

CHUNK = 1 << 20  #: bytes read at a time: a multi-gigabyte file is hashed in bounded memory


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """The hex sha256 of the file at ``path``, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(directory: Path, exclude: Collection[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``directory`` by its relative POSIX path (sorted), except the
    paths in ``exclude`` (a listing never hashes itself). Symlinks are followed; directories are not
    listed."""
    directory = Path(directory)
    found = {}
    for p in sorted(directory.rglob("*")):
        name = p.relative_to(directory).as_posix()
        if p.is_file() and name not in exclude:
            found[name] = sha256_file(p)
    return found


#: the files of a Hugging Face model directory that make it the model it is (weights, config, tokenizer)
MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer*", "vocab*", "merges.txt", "*.model")
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "special_tokens_map.json")


def _fingerprint(directory: Path, patterns: Collection[str]) -> str:
    directory = Path(directory)
    files = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def model_fingerprint(directory: Path) -> str:
    """A model directory's identity: the sha256 over its weight, config and tokenizer files' names and
    sha256 (so two copies of one model, on two machines, have one fingerprint)."""
    return _fingerprint(directory, MODEL_FILES)


def tokenizer_fingerprint(directory: Path) -> str:
    """The sha256 over a model directory's tokenizer files' names and sha256."""
    return _fingerprint(directory, TOKENIZER_FILES)
