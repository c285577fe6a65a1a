"""A local directory as a corpus: ``*.txt`` / ``*.md`` files are documents, ``*.jsonl`` lines give ``"text"``.

Hidden files and directories are skipped; a file that is not UTF-8, or a ``.jsonl`` line that is not a
JSON object with a string ``"text"``, is a one-line ``ValueError`` naming the file (and line).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cogen.core.documents import Document

__all__ = ["DirectoryCorpus"]


@dataclass(frozen=True)
class DirectoryCorpus:
    """A local directory: ``*.txt``/``*.md`` files are documents; ``*.jsonl`` lines give ``"text"``."""

    root: Path
    name: str = ""
    description: str = "local directory of .txt, .md and .jsonl files"

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise ValueError(f"corpus directory {self.root} does not exist or is not a directory")
        if not self.name:
            object.__setattr__(self, "name", str(self.root))

    def _files(self) -> list[tuple[str, Path]]:
        found = []
        for path in self.root.rglob("*"):
            relpath = path.relative_to(self.root).as_posix()
            hidden = any(part.startswith(".") for part in path.relative_to(self.root).parts)
            if path.suffix in {".txt", ".md", ".jsonl"} and path.is_file() and not hidden:
                found.append((relpath, path))
        return sorted(found)

    def documents(self) -> Iterator[Document]:
        for relpath, path in self._files():
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(relpath, path)
                continue
            text = _read_text(path)
            if text.strip():
                yield Document(id=relpath, text=text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def _jsonl_documents(relpath: str, path: Path) -> Iterator[Document]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        if record["text"].strip():
            yield Document(id=f"{relpath}:{lineno}", text=record["text"])
