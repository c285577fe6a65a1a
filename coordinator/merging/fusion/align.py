"""Cross-tokenizer alignment on the text, for distilling a teacher with another tokenizer.

Both tokenizers cut the same text; their offset mappings give each token's character span. A *group*
is the smallest run of student tokens and of teacher tokens that cover the same stretch of text: it
ends where both tokenizations have a boundary (a token ends there and the next one starts at or after
it). A 1:1 group whose two tokens are the same string maps directly (the teacher's distribution at
that position carries over through :func:`vocab_map`); any other group is merged by the chain rule —
the teacher's probability of the whole span is the product of its tokens' conditional probabilities
(:func:`span_logprobs`) — or compared without a vocabulary by :func:`uld_distance` (Universal Logit
Distillation: the L1 distance between the sorted probability vectors).

Identical tokenizers give the identity alignment: one 1:1 exact group per token.

TRL's ``trl.experimental.gold`` (``GOLDTrainer``) does the same on full-vocabulary logits of both
models inside a ``transformers.Trainer``; cogen's fusion streams only the teachers' top-k and trains
its own student loop, so it aligns here, on the offset mappings, with no Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Span = tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Student tokens ``student[0]:student[1]`` and teacher tokens ``teacher[0]:teacher[1]`` that cover
    the same text; ``exact`` when both are one token of the same string."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    exact: bool = False


@dataclass(frozen=True)
class Alignment:
    """The groups of one text, in order; every token of either side is in exactly one group."""

    groups: tuple[Group, ...]

    @property
    def is_identity(self) -> bool:
        """Every group is one exact token on each side, at the same index."""
        return all(
            g.exact and g.student == g.teacher and g.student[1] == g.student[0] + 1 for g in self.groups
        )


def token_spans(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """``text``'s token ids (no special tokens) and each token's character span, from a fast tokenizer."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if "offset_mapping" not in encoded:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} gives no offset mapping; use a fast tokenizer"
        )
    return list(encoded["input_ids"]), [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def _boundaries(spans: list[Span]) -> list[int | None]:
    """For each token, the character offset its group may end at, or ``None`` where the next token
    starts before it ends (a byte-level tokenizer splitting one character over several tokens)."""
    ends: list[int | None] = []
    for i, (_, end) in enumerate(spans):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else None
        ends.append(end if nxt is None or nxt >= end else None)
    return ends


def align_spans(student: list[Span], teacher: list[Span]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Groups ``((s0, s1), (t0, t1))`` of token ranges that end at a shared boundary (see module doc).

    The last group ends at the end of both tokenizations; spans must cover the same text.
    """
    if not student or not teacher:
        raise ValueError("cannot align an empty tokenization")
    if student[-1][1] != teacher[-1][1] or student[0][0] != teacher[0][0]:
        raise ValueError(
            f"the tokenizations cover different text: characters {student[0][0]}..{student[-1][1]} "
            f"and {teacher[0][0]}..{teacher[-1][1]}"
        )
    s_ends, t_ends = _boundaries(student), _boundaries(teacher)
    groups = []
    i = j = 0
    s0 = t0 = 0
    while i < len(student) and j < len(teacher):
        if s_ends[i] is not None and s_ends[i] == t_ends[j]:
            groups.append(((s0, i + 1), (t0, j + 1)))
            i, j = i + 1, j + 1
            s0, t0 = i, j
        elif student[i][1] < teacher[j][1] or (student[i][1] == teacher[j][1] and s_ends[i] is None):
            i += 1  # the student's token ends first (or is no boundary): the group goes on
        else:
            j += 1
    if i != len(student) or j != len(teacher):
        groups.append(((s0, len(student)), (t0, len(teacher))))  # the rest: one trailing group
    return groups


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> torch.Tensor:
    """``[teacher vocab]`` int64: each teacher token id's student token id of the same string, or -1.

    Byte-level BPE tokenizers (GPT-2, SmolLM2) write a token as the same string of byte symbols, so
    equal strings are equal bytes.
    """
    student_vocab = student_tokenizer.get_vocab()
    out = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    for token, teacher_id in teacher_tokenizer.get_vocab().items():
        student_id = student_vocab.get(token)
        if student_id is not None and teacher_id < len(out):
            out[teacher_id] = student_id
    return out


def align(
    student_ids: list[int],
    student: list[Span],
    teacher_ids: list[int],
    teacher: list[Span],
    mapping: torch.Tensor,
) -> Alignment:
    """The :class:`Alignment` of one text; ``mapping`` is :func:`vocab_map` (teacher id -> student id)."""
    groups = []
    for (s0, s1), (t0, t1) in align_spans(student, teacher):
        same = s1 - s0 == t1 - t0 and all(
            int(mapping[teacher_ids[t]]) == student_ids[s]
            for s, t in zip(range(s0, s1), range(t0, t1), strict=True)
        )
        if same:  # token for token the same strings (a character cut into byte tokens alike on both sides)
            groups += [
                Group((s, s + 1), (t, t + 1), True) for s, t in zip(range(s0, s1), range(t0, t1), strict=True)
            ]
        else:
            groups.append(Group((s0, s1), (t0, t1), False))
    return Alignment(tuple(groups))


def span_logprobs(token_logprobs: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The chain rule over spans: ``log p(span) = Σ log p(token | prefix)`` for each ``(start, end)``
    range of ``token_logprobs`` ``[n]`` (the log-probability of each actual token)."""
    sums = torch.cat([token_logprobs.new_zeros(1), token_logprobs.cumsum(0)])
    starts = torch.tensor([a for a, _ in ranges], dtype=torch.long)
    ends = torch.tensor([b for _, b in ranges], dtype=torch.long)
    return sums[ends] - sums[starts]


def uld_distance(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """Universal Logit Distillation: mean over rows of the L1 distance between the two sorted
    probability vectors (the top ``k`` of each, zero-padded to the same length); no vocabulary needed."""
    k = k or max(student_probs.shape[-1], teacher_probs.shape[-1])
    s = student_probs.sort(dim=-1, descending=True).values[..., :k]
    t = teacher_probs.sort(dim=-1, descending=True).values[..., :k]
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(dim=-1).mean()
