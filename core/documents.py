"""What a corpus is: :class:`Document` records yielded by anything with a name and a description.

A corpus is anything with a ``name``, a ``description`` and a ``documents()`` iterator that yields
:class:`Document` records (a stable ``id`` plus ``text``) in a deterministic order. The built-in
domains are in :mod:`cogen.core.builtin_corpora`, a local directory is
:mod:`cogen.core.directory_corpus`, the registry that names them is :mod:`cogen.core.corpora`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Corpus", "Document", "source_of"]

_LINE_SUFFIX = re.compile(r":\d+$")


@dataclass(frozen=True)
class Document:
    """One unit of text; ``id`` is stable across runs and machines (it decides the split and shard)."""

    id: str
    text: str


@runtime_checkable
class Corpus(Protocol):
    """A named source of documents, yielded lazily in a deterministic order."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def documents(self) -> Iterator[Document]: ...


def source_of(doc_id: str) -> str:
    """The data source a document belongs to, from its id alone: a jsonl file's line number is dropped
    (``"notes.jsonl:12"`` -> ``"notes.jsonl"``), then a nested path names its top directory
    (``"papers/2024/a.txt"`` -> ``"papers"``), a top-level file itself, and a built-in corpus id its
    prefix (``"icd10:A00"`` -> ``"icd10"``; ``"stdlib:json/decoder.py"`` -> ``"stdlib:json"``)."""
    path = _LINE_SUFFIX.sub("", doc_id)
    if "/" in path:
        return path.split("/", 1)[0]
    return path.split(":", 1)[0] if ":" in path else path
