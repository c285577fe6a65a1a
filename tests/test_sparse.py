"""The sparse compressor on hand-made tensors: error feedback, the wire format and what it refuses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from cogen.node.sparse import SparseCompressor


def test_error_feedback_returns_what_was_not_sent_on_the_next_round() -> None:
    comp = SparseCompressor([torch.Size([8])], chunk=4, k=1, bits=8)
    delta = torch.tensor([1.0, -5.0, 2.0, 0.5, 0.0, 3.0, -1.0, 0.25])
    (sent,) = comp.compress([delta])
    first = comp.decode(sent)
    assert torch.allclose(first, torch.tensor([0.0, -5.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]))
    assert torch.equal(comp.error[0], torch.zeros(8))  # nothing kept before the round is applied
    comp.commit()
    assert torch.allclose(comp.error[0], delta - first)  # all that was left out is kept
    (again,) = comp.compress([torch.zeros(8)])  # nothing new: the largest leftovers go out now
    assert torch.allclose(comp.decode(again), torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0, -1.0, 0.0]))
    comp.commit()
    sent_total = first + comp.decode(again) + comp.error[0]
    assert torch.allclose(sent_total, delta)  # sent twice plus the buffer is exactly the input


def test_a_round_not_applied_leaves_the_error_buffer_as_it_was() -> None:
    comp = SparseCompressor([torch.Size([8])], chunk=4, k=1, bits=8)
    comp.compress([torch.arange(8.0)])
    comp.commit()
    kept = comp.error[0].clone()
    comp.compress([torch.ones(8)])  # a round that fails: its pseudo-gradient comes again next time
    (retry,) = comp.compress([torch.ones(8)])
    comp.commit()
    assert torch.allclose(comp.decode(retry) + comp.error[0], kept + torch.ones(8))  # counted once


def test_low_bit_quantisation_error_is_kept_too_and_decay_scales_the_buffer() -> None:
    comp = SparseCompressor([torch.Size([4])], chunk=4, k=2, bits=2, decay=0.5)  # codes in {-1, 0, 1}
    delta = torch.tensor([1.0, 0.4, 0.0, 0.0])
    (sent,) = comp.compress([delta])
    comp.commit()
    assert torch.allclose(comp.decode(sent) + comp.error[0], delta)
    assert comp.error[0][1].item() == pytest.approx(0.4)  # 0.4 rounds to code 0: kept for later
    (nothing_new,) = comp.compress([torch.zeros(4)])
    assert torch.allclose(comp.decode(nothing_new), torch.tensor([0.0, 0.2, 0.0, 0.0]))  # 0.5 x 0.4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_wire_format_decodes_to_what_was_sent_in_a_fraction_of_the_bytes(bits: int) -> None:
    shapes = [torch.Size([64, 512]), torch.Size([300])]
    comp = SparseCompressor(shapes, chunk=4096, k=64, bits=bits)
    g = torch.Generator().manual_seed(bits)
    sents = comp.compress([torch.randn(s, generator=g) for s in shapes])
    wire = comp.encode(sents)
    decoded = comp.decode_wire(wire)
    assert isinstance(decoded, list)
    for got, sent, shape in zip(decoded, sents, shapes, strict=True):
        assert torch.equal(got, comp.decode(sent).view(shape))
    size = sum(t.ByteSize() for t in wire)
    assert size <= comp.nbytes()  # the estimate GroupAverager reports is an upper bound
    assert size * 40 < 4 * sum(s.numel() for s in shapes)  # > 40x less than fp32 at 64 of 4096 kept


def _tamper(wire: list[runtime_pb2.Tensor], part: int, make: Callable[[torch.Tensor], torch.Tensor]) -> list:
    from hivemind.compression import deserialize_torch_tensor

    out = list(wire)
    out[part] = serialize_torch_tensor(make(deserialize_torch_tensor(wire[part])), wire[part].compression)
    return out


def test_hostile_wire_tensors_are_refused_with_a_reason() -> None:
    comp = SparseCompressor([torch.Size([1000])], chunk=256, k=8, bits=2)
    wire = comp.encode(comp.compress([torch.randn(1000, generator=torch.Generator().manual_seed(0))]))
    cases = {
        "repeats": _tamper(wire, 0, lambda t: t.index_fill(1, torch.tensor([1]), int(t[0, 0]))),
        "outside its chunk": _tamper(wire, 0, lambda t: t.index_fill(1, torch.tensor([7]), 300)),
        "codes out of range": _tamper(wire, 1, lambda t: t.fill_(255)),  # code 3 of 2 bits: beyond +-1
        "not finite": _tamper(wire, 2, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
        "fit this model": wire[:2],
    }
    for why, tensors in cases.items():
        assert why in str(comp.decode_wire(tensors)), why
    huge = list(wire)
    huge[0] = runtime_pb2.Tensor()
    huge[0].CopyFrom(wire[0])
    huge[0].size[:] = [1 << 20, 8]  # a header that would make a decoder allocate 16 MB for nothing
    assert comp.decode_wire(huge) == "does not fit this model"
    short = list(wire)
    short[2] = runtime_pb2.Tensor()
    short[2].CopyFrom(wire[2])
    short[2].buffer = wire[2].buffer[:-4]  # the header is right, the bytes are not
    assert "cannot be decoded" in str(comp.decode_wire(short))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])], chunk=4, k=5)
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])], bits=3)
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])], decay=0.0)
    with pytest.raises(ValueError):
        SparseCompressor([torch.Size([4])]).compress([torch.zeros(5)])
