"""Domain corpora: real text for each expert, by domain name from an explicit registry, or a directory.

Built-in domains (:mod:`cogen.core.builtin_corpora`): ``medical`` (ICD-10-CM descriptions), ``legal``
(licence texts), ``code`` (the CPython standard library), ``literature`` (the King James Bible). Any
existing directory works too (:class:`~cogen.core.directory_corpus.DirectoryCorpus`). What a corpus
and its documents are: :mod:`cogen.core.documents`.

:func:`get_corpus` resolves a domain name or a directory path; :func:`register_domain` adds a domain to
the explicit registry, which refuses duplicate names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cogen.core.builtin_corpora import BibleCorpus, ICD10Corpus, LicenseCorpus, StdlibCorpus
from cogen.core.directory_corpus import DirectoryCorpus
from cogen.core.documents import Corpus

__all__ = ["CorpusFactory", "get_corpus", "known_domains", "register_domain"]

CorpusFactory = Callable[[], Corpus]
_DOMAINS: dict[str, CorpusFactory] = {}


def register_domain(name: str, factory: CorpusFactory) -> None:
    """Add a named domain; ``factory()`` builds its corpus. A name can be registered only once."""
    if name in _DOMAINS:
        raise ValueError(f"domain {name!r} is already registered")
    _DOMAINS[name] = factory


def known_domains() -> list[str]:
    """The registered domain names, sorted."""
    return sorted(_DOMAINS)


def get_corpus(name_or_path: str) -> Corpus:
    """The corpus of a registered domain, or a :class:`DirectoryCorpus` for an existing directory."""
    if name_or_path in _DOMAINS:
        return _DOMAINS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return DirectoryCorpus(path)
    raise ValueError(
        f"unknown domain {name_or_path!r} (not a directory either); "
        f"known domains: {', '.join(known_domains())}"
    )


register_domain("medical", ICD10Corpus)
register_domain("legal", LicenseCorpus)
register_domain("code", StdlibCorpus)
register_domain("literature", BibleCorpus)
