"""The sparse compressor: what is not sent comes back on the next round (hand-made tensors)."""

from __future__ import annotations

import pytest
import torch

from cogen.node.sparse import SparseCompressor, shared_chunks


def test_error_feedback_returns_what_was_not_sent_on_the_next_round() -> None:
    comp = SparseCompressor([torch.Size([8])], chunk=4, k=1, bits=8)
    delta = torch.tensor([1.0, -5.0, 2.0, 0.5, 0.0, 3.0, -1.0, 0.25])
    (sent,) = comp.compress([delta])
    first = comp.decode(sent)
    assert torch.allclose(first, torch.tensor([0.0, -5.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]))
    assert torch.allclose(comp.error[0], delta - first)  # all that was left out is kept
    (again,) = comp.compress([torch.zeros(8)])  # nothing new: the largest leftovers go out now
    assert torch.allclose(comp.decode(again), torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0, -1.0, 0.0]))
    sent_total = first + comp.decode(again) + comp.error[0]
    assert torch.allclose(sent_total, delta)  # sent twice plus the buffer is exactly the input


def test_low_bit_quantisation_error_is_kept_too() -> None:
    comp = SparseCompressor([torch.Size([4])], chunk=4, k=2, bits=2)  # codes in {-1, 0, 1}
    delta = torch.tensor([1.0, 0.4, 0.0, 0.0])
    (sent,) = comp.compress([delta])
    assert torch.allclose(comp.decode(sent) + comp.error[0], delta)
    assert comp.error[0][1].item() == pytest.approx(0.4)  # 0.4 rounds to code 0: kept for later


def test_members_choose_the_same_chunks_and_bad_input_is_refused() -> None:
    assert shared_chunks(torch.tensor([0.1, 3.0, 2.0, 0.0]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError):
        shared_chunks(torch.tensor([float("nan"), 1.0]), 1)
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])], chunk=4, k=5)
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])]).compress([torch.zeros(5)])
