"""Cross-tokenizer alignment on the text: which student and teacher tokens cover the same bytes.

Both tokenizations of one text are cut into *groups*: the shortest runs of student tokens and of teacher
tokens that cover the same byte span (a group ends wherever both tokenizations have a token boundary).
A one-to-one group maps directly (the two tokens are the same bytes, so the teacher's next-token
distribution at the position before it is projected onto the student's vocabulary through
:class:`VocabularyMap`); a group of one student token and several teacher tokens is merged with the chain
rule (the teacher's probability of the student's token is the product of its tokens' probabilities over
the shared span); any other group falls back to a vocabulary-free loss (Universal Logit Distillation).

A token's bytes come from the byte-level table for byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3),
else from the tokenizer's character offsets; special tokens cover no bytes and belong to no group.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from cogen.coordinator.merging.registry import MergeError


class AlignmentError(MergeError):
    """Two tokenizations of one text cannot be aligned (one-line explanation)."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of the GPT-2 byte-to-unicode table that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a fast byte-level BPE tokenizer (its tokens are written as bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return bool(decoder.get("type") == "ByteLevel")


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Each token id's bytes (``b""`` for special tokens); byte-level vocabularies exactly, others as
    their decoded text."""
    special = set(tokenizer.all_special_ids)
    table = _byte_decoder()
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    out: list[bytes] = []
    byte_level = is_byte_level(tokenizer)
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            out.append(b"")
        elif byte_level and all(c in table for c in tok):
            out.append(bytes(table[c] for c in tok))
        else:
            out.append(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out


def byte_spans(
    tokenizer: Any, text: str, ids: list[int], table: list[bytes] | None = None
) -> list[tuple[int, int]]:
    """The byte span ``[start, end)`` of each token of ``ids`` (the tokenization of ``text``)."""
    data = text.encode("utf-8")
    if table is not None and is_byte_level(tokenizer):
        spans: list[tuple[int, int]] = []
        pos = 0
        for i in ids:
            piece = table[i] if 0 <= i < len(table) else b""
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        if b"".join(table[i] for i in ids if 0 <= i < len(table)) == data:
            return spans
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    body = [i for i in ids if i not in set(tokenizer.all_special_ids)]
    if list(enc["input_ids"]) != body:
        raise AlignmentError("the token ids are not the tokenizer's tokenization of the text")
    starts = [len(text[:a].encode("utf-8")) for a, _ in enc["offset_mapping"]] + [len(data)]
    body_spans = iter(itertools.pairwise(starts))
    special = set(tokenizer.all_special_ids)
    return [(0, 0) if i in special else next(body_spans) for i in ids]


@dataclass(frozen=True)
class Group:
    """Student tokens ``[s0, s1)`` and teacher tokens ``[t0, t1)`` that cover the same bytes."""

    s0: int
    s1: int
    t0: int
    t1: int

    @property
    def exact(self) -> bool:
        return self.s1 - self.s0 == 1 and self.t1 - self.t0 == 1


def align_spans(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> list[Group]:
    """The groups of two tokenizations of one text, given each token's byte span (empty spans skipped)."""
    s = [i for i, (a, b) in enumerate(student) if b > a]
    t = [j for j, (a, b) in enumerate(teacher) if b > a]
    s_total = student[s[-1]][1] if s else 0
    t_total = teacher[t[-1]][1] if t else 0
    if s_total != t_total:
        raise AlignmentError(f"the tokenizations cover {s_total} and {t_total} bytes; not the same text")
    groups: list[Group] = []
    i = j = 0
    while i < len(s) and j < len(t):
        gi, gj = i, j
        s_end, t_end = student[s[i]][1], teacher[t[j]][1]
        while s_end != t_end:
            if s_end < t_end:
                i += 1
                s_end = student[s[i]][1]
            else:
                j += 1
                t_end = teacher[t[j]][1]
        groups.append(Group(s[gi], s[i] + 1, t[gj], t[j] + 1))
        i += 1
        j += 1
    return groups


@dataclass(frozen=True)
class Alignment:
    """Where the student's next-token predictions meet the teacher's, by position (``logits[p]``
    predicts token ``p + 1``).

    ``exact``: (student position, teacher position) predicting the same bytes — project and match
    the distributions; ``chain``: (student position, first teacher position, last teacher position + 1)
    — the teacher's probability of the student's next token is the product of its own tokens'
    probabilities over that range; ``uld``: (student position, teacher position) for the rest.
    """

    groups: tuple[Group, ...]
    exact: tuple[tuple[int, int], ...]
    chain: tuple[tuple[int, int, int], ...]
    uld: tuple[tuple[int, int], ...]


def positions(groups: list[Group]) -> Alignment:
    """The prediction positions of each kind; a group whose first token opens either sequence (nothing
    predicts it) is left out."""
    exact: list[tuple[int, int]] = []
    chain: list[tuple[int, int, int]] = []
    uld: list[tuple[int, int]] = []
    for g in groups:
        if g.s0 == 0 or g.t0 == 0:
            continue
        if g.exact:
            exact.append((g.s0 - 1, g.t0 - 1))
        elif g.s1 - g.s0 == 1:
            chain.append((g.s0 - 1, g.t0 - 1, g.t1 - 1))
        else:
            uld.extend((g.s0 - 1 + k, g.t0 - 1 + k) for k in range(min(g.s1 - g.s0, g.t1 - g.t0)))
    return Alignment(tuple(groups), tuple(exact), tuple(chain), tuple(uld))


def vocab_keys(tokenizer: Any, table: list[bytes]) -> list[bytes]:
    """What makes two tokenizers' tokens the same: their bytes, or for special tokens their name."""
    keys = list(table)
    for i in tokenizer.all_special_ids:
        if 0 <= i < len(keys):
            keys[i] = b"\0special:" + str(tokenizer.convert_ids_to_tokens(i)).encode("utf-8")
    return keys


class Aligner:
    """Aligns a student tokenizer with a teacher tokenizer (the byte tables are built once)."""

    def __init__(self, student: Any, teacher: Any) -> None:
        self.student, self.teacher = student, teacher
        self.student_bytes = token_bytes(student)
        self.teacher_bytes = token_bytes(teacher)
        self.vocab = VocabularyMap(
            vocab_keys(teacher, self.teacher_bytes), vocab_keys(student, self.student_bytes)
        )

    def align(self, text: str, student_ids: list[int], teacher_ids: list[int]) -> Alignment:
        s = byte_spans(self.student, text, student_ids, self.student_bytes)
        t = byte_spans(self.teacher, text, teacher_ids, self.teacher_bytes)
        return positions(align_spans(s, t))


class VocabularyMap:
    """Teacher token id -> the student token id with the same key (:func:`vocab_keys`; -1 where the
    student has none)."""

    def __init__(self, teacher_keys: list[bytes], student_keys: list[bytes]) -> None:
        index = {b: i for i, b in reversed(list(enumerate(student_keys))) if b}
        self.table = torch.tensor([index.get(b, -1) if b else -1 for b in teacher_keys], dtype=torch.long)
        self.identity = teacher_keys == student_keys

    @property
    def coverage(self) -> float:
        """The fraction of the teacher's vocabulary the student has."""
        return float((self.table >= 0).float().mean()) if len(self.table) else 0.0

    def project(self, ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k ``ids`` / ``probs`` (``[..., k]``) in student ids; unmapped entries get id 0 and
        probability 0, and each row is renormalised over what maps (a row with nothing mapped stays 0)."""
        mapped = self.table.to(ids.device)[ids.long().clamp(0, len(self.table) - 1)]
        ok = (mapped >= 0) & (ids >= 0) & (ids < len(self.table))
        kept = torch.where(ok, probs, torch.zeros_like(probs))
        total = kept.sum(dim=-1, keepdim=True)
        return torch.where(ok, mapped, 0), torch.where(total > 0, kept / total.clamp_min(1e-30), kept)
