"""The teachers' side of fusion: a bounded corpus, each teacher's top-k next-token targets, MinCE.

**Corpus** (:func:`fusion_corpus`): per domain, ``sequences`` blocks of its *training* split (never the
validation text the gate and the evaluation judge on), decoded to text and cut where the student's
first ``length`` tokens end, so that every teacher reads exactly the text the student is trained on.

**Teacher pass** (:func:`teacher_targets`): a teacher runs on the corpus ``chunk`` sequences at a time;
of each position's next-token distribution only the top ``k`` log-probabilities are kept (in the
student's vocabulary), so memory holds one chunk's logits and ``N · L · k`` targets, never the
full-vocabulary distributions of the corpus. A teacher with the student's tokenizer predicts every
student position. A teacher with another tokenizer is aligned on the text (:mod:`.align`): where a
student token and a teacher token are the same string (an exact 1:1 group), the teacher's distribution
before it carries over through the vocabulary map (the mass of tokens the student lacks goes to the
student's rest-of-vocabulary bucket, :mod:`.student`); at the start of every other group only the
sorted top-k probabilities are kept, for the vocabulary-free ULD loss. Each teacher's cross-entropy on
each text is measured *per byte*, so teachers with different tokenizers compare.

**MinCE** (:func:`min_ce`): per text, the teacher with the lowest cross-entropy per byte is its target
(FuseLLM's MinCE), among the teachers a candidate keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from cogen.coordinator.merging.fusion.align import align, token_spans, vocab_map
from cogen.coordinator.merging.moe.training import training_blocks
from cogen.coordinator.merging.registry import MergeError

logger = logging.getLogger(__name__)

__all__ = ["FusionText", "Targets", "TeacherLike", "fusion_corpus", "min_ce", "teacher_targets"]


@dataclass(frozen=True)
class FusionText:
    """One text of the fusion corpus: its domain, the text, the student's ids and their character spans."""

    domain: str
    text: str
    ids: list[int]
    spans: list[tuple[int, int]]

    @property
    def predicted_bytes(self) -> int:
        """UTF-8 bytes after the first student token: what a next-token loss covers."""
        return max(1, len(self.text[self.spans[0][1] :].encode()))


class TeacherLike(Protocol):
    @property
    def name(self) -> str: ...

    def open(self) -> AbstractContextManager[tuple[nn.Module, Any | None]]:
        """The teacher model, and its tokenizer when it is not the student's (None)."""
        ...


@dataclass
class Targets:
    """One teacher's targets on a corpus, per text: the student positions it teaches (position ``p``
    predicts token ``p + 1``), their top-k student ids (-1: none) and log-probabilities, the positions
    where only a ULD target exists and its sorted top-k probabilities, and the per-byte cross-entropy."""

    name: str
    ce_per_byte: list[float] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)  # [P] int64
    indices: list[torch.Tensor] = field(default_factory=list)  # [P, k] int64, -1 where unmapped
    logprobs: list[torch.Tensor] = field(default_factory=list)  # [P, k] float32
    uld_positions: list[torch.Tensor] = field(default_factory=list)  # [Q] int64
    uld_probs: list[torch.Tensor] = field(default_factory=list)  # [Q, k] float32, sorted descending
    tokens: int = 0  # forward-pass tokens the teacher ran
    seconds: float = 0.0

    def nbytes(self) -> int:
        tensors = [*self.positions, *self.indices, *self.logprobs, *self.uld_positions, *self.uld_probs]
        return sum(t.numel() * t.element_size() for t in tensors)


def fusion_corpus(
    domains: Sequence[str], tokenizer: Any, length: int, sequences: int, seed: int = 0
) -> list[FusionText]:
    """``sequences`` texts of each domain's training split, ``length`` student tokens each (see module)."""
    if length < 4 or sequences < 1:
        raise MergeError(f"a fusion corpus needs length >= 4 and sequences >= 1, got {length}, {sequences}")
    blocks = training_blocks(list(domains), tokenizer, length + 8, sequences, seed=seed)
    texts: list[FusionText] = []
    for domain, rows in blocks.items():
        for row in rows.tolist():
            text = tokenizer.decode(row, clean_up_tokenization_spaces=False)
            ids, spans = token_spans(tokenizer, text)
            if len(ids) < length:
                continue  # the round trip lost tokens (rare): the text is not used
            ids, spans = ids[:length], spans[:length]
            texts.append(FusionText(domain, text[: spans[-1][1]], ids, spans))
    if not texts:
        raise MergeError(f"no fusion text of {length} tokens in {', '.join(domains)}")
    return texts


def _chunks(items: Sequence[FusionText], size: int) -> Iterator[Sequence[FusionText]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _same_tokenizer(model: nn.Module, corpus: Sequence[FusionText], k: int, chunk: int, out: Targets) -> None:
    device = _device(model)
    for texts in _chunks(corpus, chunk):
        ids = torch.tensor([t.ids for t in texts], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        actual = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        del logprobs  # one chunk's full distributions at a time
        for i, text in enumerate(texts):
            out.ce_per_byte.append(float(-actual[i].sum()) / text.predicted_bytes)
            out.positions.append(torch.arange(len(text.ids) - 1))
            out.indices.append(top.indices[i].cpu())
            out.logprobs.append(top.values[i].cpu())
            out.uld_positions.append(torch.zeros(0, dtype=torch.long))
            out.uld_probs.append(torch.zeros(0, k))
        out.tokens += int(ids.numel())


@torch.no_grad()
def _other_tokenizer(
    model: nn.Module, teacher_tokenizer: Any, student_tokenizer: Any, corpus: Sequence[FusionText], k: int,
    out: Targets, mapping: torch.Tensor,
) -> None:  # fmt: skip
    device = _device(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 20
    for text in corpus:
        t_ids, t_spans = token_spans(teacher_tokenizer, text.text)
        if len(t_ids) > limit:
            raise MergeError(f"teacher {out.name}: a fusion text of {len(t_ids)} tokens exceeds its {limit}")
        ids = torch.tensor([t_ids], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        actual = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)
        predicted = max(1, len(text.text[t_spans[0][1] :].encode()))
        out.ce_per_byte.append(float(-actual.sum()) / predicted)
        alignment = align(text.ids, text.spans, t_ids, t_spans, mapping)
        exact = [
            (g.student[0], g.teacher[0])
            for g in alignment.groups
            if g.exact and g.student[0] and g.teacher[0]
        ]
        other = [(g.student[0], g.teacher[0]) for g in alignment.groups
                 if not g.exact and g.student[0] and g.teacher[0]]  # fmt: skip
        width = min(k, logprobs.shape[-1])
        s_pos = torch.tensor([s - 1 for s, _ in exact], dtype=torch.long)
        top = logprobs[[t - 1 for _, t in exact]].topk(width, dim=-1)
        student_ids = mapping.to(device)[top.indices]
        values = top.values.masked_fill(student_ids < 0, float("-inf"))
        usable = (student_ids >= 0).any(dim=-1).cpu()
        out.positions.append(s_pos[usable])
        out.indices.append(student_ids.cpu()[usable])
        out.logprobs.append(values.cpu()[usable])
        probs = logprobs[[t - 1 for _, t in other]].exp().topk(width, dim=-1).values
        out.uld_positions.append(torch.tensor([s - 1 for s, _ in other], dtype=torch.long))
        out.uld_probs.append(probs.cpu())
        out.tokens += len(t_ids)
        del logprobs


def teacher_targets(
    teacher: TeacherLike, corpus: Sequence[FusionText], student_tokenizer: Any, k: int = 32, chunk: int = 4
) -> Targets:
    """``teacher``'s top-``k`` targets on ``corpus`` (see the module); bounded by one chunk's logits."""
    started = time.monotonic()
    out = Targets(teacher.name)
    with teacher.open() as (model, tokenizer):
        was_training = model.training
        model.eval()
        try:
            if tokenizer is None:
                _same_tokenizer(model, corpus, k, chunk, out)
            else:
                mapping = vocab_map(student_tokenizer, tokenizer)
                if int((mapping >= 0).sum()) == 0:
                    raise MergeError(f"teacher {teacher.name}: no token of its vocabulary is the student's")
                _other_tokenizer(model, tokenizer, student_tokenizer, corpus, k, out, mapping)
        finally:
            model.train(was_training)
    out.seconds = time.monotonic() - started
    logger.info(
        "fusion teacher %s: %d texts, %d tokens, %.1f s, targets %.1f MiB, cross-entropy %.3f nats/byte",
        teacher.name, len(corpus), out.tokens, out.seconds, out.nbytes() / 2**20,
        sum(out.ce_per_byte) / max(1, len(out.ce_per_byte)),
    )  # fmt: skip
    return out


def min_ce(targets: Sequence[Targets], keep: set[str] | None = None) -> list[int]:
    """Per text, the index (into ``targets``) of the kept teacher with the lowest cross-entropy per byte."""
    usable = [i for i, t in enumerate(targets) if keep is None or t.name in keep]
    if not usable:
        raise MergeError("no fusion teacher is kept")
    count = len(targets[usable[0]].ce_per_byte)
    return [min(usable, key=lambda i: targets[i].ce_per_byte[n]) for n in range(count)]
