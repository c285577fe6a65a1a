"""Outer-gradient compression beyond 8-bit: per-chunk top-k with low-bit values and error feedback.

SparseLoCo-style (``--compression sparse``): each member adds its *error buffer* (what it did not send
before, scaled by ``decay``) to its pseudo-gradient, keeps in every chunk of ``chunk`` values only the
``k`` largest in magnitude, quantises those to ``bits`` bits (symmetric, one fp32 scale per chunk),
and keeps the rest (the values left out and the quantisation error) as the next round's error
buffer. Nothing is lost: what is not sent now is sent later. The new buffer takes effect only when
the round is applied (:meth:`SparseCompressor.commit`): after a round that failed, the next
pseudo-gradient covers the same inner steps again, and the buffer must not count them twice.

On the wire, one model tensor is three tensors (hivemind's ``serialize_torch_tensor``, no further
compression): the kept positions inside each chunk (int16), the codes packed ``8 // bits`` to a byte
(uint8), and the scales (float32). About ``k * (2 + bits / 8) + 4`` bytes per chunk: 148 bytes for the
16 KiB of fp32 values in a chunk at the defaults (64 of 4096 kept, 2 bits), 110x less.

The members' kept positions differ, so hivemind's butterfly all-reduce, which averages tensors of one
layout, cannot carry them: they go whole to every member through the round exchange
(:mod:`cogen.node.robust_rounds`), each member decodes every member's (:meth:`SparseCompressor.decode_wire`
checks each header before it allocates anything, and refuses positions out of range or repeated,
codes out of range and non-finite scales) and all compute the same aggregate from the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

PARTS = 3  #: wire tensors per model tensor: positions, packed codes, scales
HEADER_BYTES = 64  # what one serialized tensor's header costs, roughly (for the byte estimate)


@dataclass
class Sent:
    """What one member puts on the wire for one tensor: per chunk, the kept positions, their codes
    and one scale; ``numel`` is the flattened length of the tensor."""

    indices: torch.Tensor  # int64 (chunks, k): positions inside each chunk
    codes: torch.Tensor  # int8 (chunks, k): quantised values in [-(2^(bits-1) - 1), 2^(bits-1) - 1]
    scales: torch.Tensor  # float32 (chunks,)
    numel: int


class SparseCompressor:
    """Top-k per chunk, low-bit values, error feedback; one per member, for a fixed set of shapes."""

    def __init__(self, shapes: Sequence[torch.Size], chunk: int = 4096, k: int = 64, bits: int = 2,
                 decay: float = 1.0):  # fmt: skip
        if not 1 <= k <= chunk <= 32768:  # positions travel as int16
            raise ValueError(f"need 1 <= k <= chunk <= 32768, got k={k}, chunk={chunk}")
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"the error decay must be in (0, 1], got {decay}")
        self.chunk, self.k, self.bits, self.decay = chunk, k, bits, decay
        self.top = 2 ** (bits - 1) - 1
        self.shapes = [torch.Size(s) for s in shapes]
        self.error = [torch.zeros(s, dtype=torch.float32) for s in self.shapes]
        self.pending: list[torch.Tensor] | None = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = (-flat.numel()) % self.chunk
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, self.chunk)

    def compress(self, delta: Sequence[torch.Tensor]) -> list[Sent]:
        """Encode ``delta`` plus the (decayed) error buffer; what was not sent becomes the pending
        buffer, which :meth:`commit` makes the error buffer once the round is applied."""
        if [t.shape for t in delta] != self.shapes:
            raise ValueError("the pseudo-gradient does not match the compressor's shapes")
        out, pending = [], []
        for d, e in zip(delta, self.error, strict=True):
            full = d.detach().float().cpu() + self.decay * e
            rows = self._rows(full)
            k = min(self.k, rows.shape[1])
            idx = rows.abs().topk(k, dim=1).indices.sort(dim=1).values
            vals = rows.gather(1, idx)
            scales = vals.abs().amax(dim=1).clamp_min(1e-30)
            codes = (vals / scales[:, None] * self.top).round().clamp(-self.top, self.top).to(torch.int8)
            sent = Sent(idx, codes, scales, full.numel())
            pending.append(full - self.decode(sent).view(full.shape))
            out.append(sent)
        self.pending = pending
        return out

    def commit(self) -> None:
        """The round that sent the last :meth:`compress` was applied: keep what it left out."""
        if self.pending is not None:
            self.error, self.pending = self.pending, None

    def decode(self, sent: Sent) -> torch.Tensor:
        """The dense flat tensor that ``sent`` stands for."""
        rows = torch.zeros(sent.indices.shape[0], self.chunk, dtype=torch.float32)
        rows.scatter_(1, sent.indices, sent.codes.float() * (sent.scales[:, None] / self.top))
        return rows.reshape(-1)[: sent.numel]

    def encode(self, sents: Sequence[Sent]) -> list[runtime_pb2.Tensor]:
        """The wire tensors of ``sents`` (:data:`PARTS` per model tensor)."""
        none = runtime_pb2.CompressionType.NONE
        out = []
        for s in sents:
            out.append(serialize_torch_tensor(s.indices.to(torch.int16), none))
            out.append(serialize_torch_tensor(self._pack(s.codes), none))
            out.append(serialize_torch_tensor(s.scales.float(), none))
        return out

    def decode_wire(self, tensors: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor] | str:
        """A member's dense delta from its wire tensors, or why they are refused (one line)."""
        if len(tensors) != PARTS * len(self.shapes):
            return "does not fit this model"
        out = []
        for i, shape in enumerate(self.shapes):
            numel = shape.numel()
            chunks, k = -(-numel // self.chunk), min(self.k, self.chunk)
            expected = (
                ("int16", [chunks, k]),
                ("uint8", [chunks, self._packed_width(k)]),
                ("float32", [chunks]),
            )
            parts = tensors[PARTS * i : PARTS * (i + 1)]
            for t, (dtype, size) in zip(parts, expected, strict=True):  # before decoding: no huge allocation
                if (
                    t.compression != runtime_pb2.CompressionType.NONE
                    or t.dtype != dtype
                    or list(t.size) != size
                ):
                    return "does not fit this model"
            try:
                idx, packed, scales = (deserialize_torch_tensor(t) for t in parts)
            except Exception as e:  # a buffer of the wrong length: numpy and torch raise several types
                return f"cannot be decoded ({type(e).__name__})"
            idx = idx.long()
            if k > 1 and not bool((idx.diff(dim=1) > 0).all()):
                return "repeats or disorders its kept positions"
            if bool(((idx < 0) | (idx >= self.chunk)).any()):
                return "has a kept position outside its chunk"
            codes = self._unpack(packed, k)
            if codes is None:
                return "has codes out of range"
            if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
                return "has a scale that is negative or not finite"
            out.append(self.decode(Sent(idx, codes, scales, numel)).view(shape))
        return out

    def nbytes(self) -> int:
        """What :meth:`encode` puts on the wire for this model, headers included (roughly)."""
        total = 0
        for shape in self.shapes:
            chunks, k = -(-shape.numel() // self.chunk), min(self.k, self.chunk)
            total += chunks * (2 * k + self._packed_width(k) + 4) + PARTS * HEADER_BYTES
        return total

    def _packed_width(self, k: int) -> int:
        return math.ceil(k * self.bits / 8)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        per = 8 // self.bits
        u = (codes.to(torch.int16) + self.top).to(torch.uint8)  # 0 .. 2 * top
        pad = (-u.shape[1]) % per
        u = torch.nn.functional.pad(u, (0, pad)).view(u.shape[0], -1, per)
        shifts = torch.arange(per, dtype=torch.uint8) * self.bits
        return (u << shifts).sum(dim=2, dtype=torch.int32).to(torch.uint8)

    def _unpack(self, packed: torch.Tensor, k: int) -> torch.Tensor | None:
        per = 8 // self.bits
        shifts = torch.arange(per, dtype=torch.int32) * self.bits
        u = (packed.to(torch.int32)[:, :, None] >> shifts) & (2**self.bits - 1)
        u = u.reshape(packed.shape[0], -1)
        if bool((u[:, :k] > 2 * self.top).any()):
            return None
        return (u[:, :k] - self.top).to(torch.int8)
