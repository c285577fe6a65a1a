"""How a member's whole delta travels through the round exchange, and how every member decodes it.

:class:`~cogen.node.robust_rounds.ExchangeRounds` sends each member's delta to every other member.
A codec turns the delta into wire tensors (``runtime_pb2.Tensor``, whose digest the member commits
to in its round claim), decodes a peer's wire tensors after checking that they fit this model (a
hostile peer's header must not make a decoder allocate what it likes), and says what it sends:

- :class:`DenseCodec` (``--compression 8bit | fp16 | none``): hivemind's compressions, as the
  butterfly all-reduce would send them;
- :class:`SparseCodec` (``--compression sparse``): top-k per chunk with low-bit values and error
  feedback (:mod:`cogen.node.sparse`); the error buffer moves on only when the round is applied
  (:meth:`SparseCodec.commit`).

A member's own delta is the decoding of its own wire tensors, so every member aggregates the same
numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from cogen.core.config import GroupConfig
from cogen.node.sparse import SparseCompressor
from cogen.node.wire import all_finite, wire_compression

Encoded = tuple[list[runtime_pb2.Tensor], list[torch.Tensor]]  # wire tensors, and their decoding


class Codec(Protocol):
    def encode(self, delta: Sequence[torch.Tensor]) -> Encoded: ...

    def decode(self, tensors: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor] | str: ...

    def commit(self) -> None: ...

    def nbytes(self) -> int: ...


class DenseCodec:
    """Every value, through one of hivemind's compressions."""

    def __init__(self, tensors: Sequence[torch.Tensor], compression: CompressionBase):
        self.compression = compression
        self.shapes = [t.shape for t in tensors]
        self._nbytes = int(sum(
            t.numel() * 4 * compression.estimate_compression_ratio(CompressionInfo.from_tensor(t))
            for t in tensors
        ))  # fmt: skip

    def encode(self, delta: Sequence[torch.Tensor]) -> Encoded:
        serialized = [self.compression.compress(d, CompressionInfo.from_tensor(d)) for d in delta]
        return serialized, [deserialize_torch_tensor(s).float() for s in serialized]

    def decode(self, tensors: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor] | str:
        if [list(t.size) for t in tensors] != [list(s) for s in self.shapes] or any(
            t.dtype != "float32" for t in tensors
        ):
            return "does not fit this model"  # checked before decoding: a decoder allocates what it says
        try:
            delta = [deserialize_torch_tensor(t).float() for t in tensors]
        except Exception as e:  # a malformed encoding: hivemind's decoders raise several types
            return f"cannot be decoded ({type(e).__name__})"
        if [d.shape for d in delta] != self.shapes or not all_finite(delta):
            return "is not finite, or not of this model's shapes"
        return delta

    def commit(self) -> None:
        """Nothing is kept between rounds."""

    def nbytes(self) -> int:
        return self._nbytes


class SparseCodec:
    """Top-k per chunk, low-bit values, error feedback (:class:`~cogen.node.sparse.SparseCompressor`)."""

    def __init__(self, tensors: Sequence[torch.Tensor], cfg: GroupConfig):
        self.compressor = SparseCompressor(
            [t.shape for t in tensors], cfg.sparse_chunk, cfg.sparse_k, cfg.sparse_bits, cfg.error_decay
        )

    def encode(self, delta: Sequence[torch.Tensor]) -> Encoded:
        sents = self.compressor.compress(delta)
        own = [self.compressor.decode(s).view(d.shape) for s, d in zip(sents, delta, strict=True)]
        return self.compressor.encode(sents), own

    def decode(self, tensors: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor] | str:
        delta = self.compressor.decode_wire(tensors)
        if isinstance(delta, list) and not all_finite(delta):
            return "is not finite"  # finite scales can still overflow times a code
        return delta

    def commit(self) -> None:
        self.compressor.commit()

    def nbytes(self) -> int:
        return self.compressor.nbytes()


def codec_for(cfg: GroupConfig, tensors: Sequence[torch.Tensor]) -> DenseCodec | SparseCodec:
    """The codec of ``cfg.compression`` for a model whose trainable tensors are ``tensors``."""
    if cfg.compression == "sparse":
        return SparseCodec(tensors, cfg)
    return DenseCodec(tensors, wire_compression(cfg.compression, cfg.compression_threshold))
