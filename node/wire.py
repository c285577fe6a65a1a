"""The group's wire: hivemind compression of pseudo-gradients, and checking what a round returned.

hivemind's all-reduce can return a partial average without raising (a part that did not arrive or
did not decode stays local). So every member sends, through the round's all-gather, a random ±1
projection and the squared norm of each chunk of its pseudo-gradient (:meth:`RoundVerifier.checks`);
after the round :meth:`RoundVerifier.verify` checks that each chunk of the result projects to the
weighted mean of the members' projections, within what the wire format can explain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
)

MIN_CHUNK = 16384  # elements per verified chunk of the delta, at least
MAX_CHUNKS = 512  # at most: the all-gather must stay small (hivemind passes it through a pipe; messages
#                  over 16 KB can be read half-written and kill the averager's command loop)
#: relative error of one trip through each wire format (measured on N(0,1): 8-bit ≈ 1.3 %, fp16 ≈ 0.02 %)
WIRE_ERROR = {"8bit": 0.015, "fp16": 3e-4, "none": 1e-6}
SIGMAS = 8.0  # how many standard deviations of wire noise a chunk's projection may be off


def wire_compression(kind: str, threshold: int) -> CompressionBase:
    """hivemind compression for the pseudo-gradients: 8-bit for large tensors, fp16 for small ones."""
    if kind == "8bit":
        return SizeAdaptiveCompression(
            threshold, less=Float16Compression(), greater_equal=BlockwiseQuantization()
        )
    if kind == "fp16":
        return Float16Compression()
    return NoCompression()


def estimate_bytes_sent(
    tensors: Sequence[torch.Tensor], compression: CompressionBase, group_size: int
) -> int:
    """Bytes one member sends in a butterfly all-reduce: its parts out, the reduced parts back."""
    if group_size < 2:
        return 0
    payload = sum(
        t.numel() * t.element_size() * compression.estimate_compression_ratio(CompressionInfo.from_tensor(t))
        for t in tensors
    )
    return int(2 * payload * (group_size - 1) / group_size)


@dataclass
class RoundChecks:
    """What a member sends about its pseudo-gradient: per chunk, a projection and a squared norm."""

    projections: list[float]
    sq_norms: list[float]


class RoundVerifier:
    """Chunk probes shared by every member of a group (same seed, same chunking for the same model)."""

    def __init__(self, tensors: Sequence[torch.Tensor], compression: str):
        self.compression = compression
        total = sum(t.numel() for t in tensors)
        self._chunk = max(MIN_CHUNK, math.ceil(total / MAX_CHUNKS))
        signs = torch.Generator().manual_seed(0x636F67656E)
        self._probes = [
            (torch.randint(0, 2, t.shape, generator=signs, dtype=torch.int8) * 2 - 1) for t in tensors
        ]

    def checks(self, delta: Sequence[torch.Tensor]) -> RoundChecks:
        """Per chunk of the concatenated delta: its projection on the probe and its squared norm."""
        flat_d = torch.cat([d.reshape(-1) for d in delta]).double()
        flat_p = torch.cat([p.reshape(-1) for p in self._probes]).double()
        pad = -flat_d.numel() % self._chunk
        rows_d = torch.nn.functional.pad(flat_d, (0, pad)).view(-1, self._chunk)
        rows_p = torch.nn.functional.pad(flat_p, (0, pad)).view(-1, self._chunk)
        projections = (rows_d * rows_p).sum(dim=1)
        sq_norms = (rows_d * rows_d).sum(dim=1)
        return RoundChecks(projections.tolist(), sq_norms.tolist())

    def verify(self, averaged: Sequence[torch.Tensor], gathered: list[Any]) -> str | None:
        """``None`` if ``averaged`` is the weighted mean of what the members sent, else why not."""
        got = self.checks(averaged)
        if not all(math.isfinite(q) for q in got.sq_norms):
            return "the average is not finite: a member sent NaN/Inf"
        members = [g for g in gathered if isinstance(g, dict)]
        try:
            weights = [float(g["weight"]) for g in members]
            projections = [[float(x) for x in g["proj"]] for g in members]
            sq_norms = [[float(x) for x in g["sq"]] for g in members]
        except (KeyError, TypeError, ValueError):
            return "a member sent malformed round metadata"
        n_chunks = len(got.projections)
        if len(members) != len(gathered) or any(
            len(p) != n_chunks or len(q) != n_chunks for p, q in zip(projections, sq_norms, strict=True)
        ):
            return "a member's round metadata does not match this model"  # fmt: skip
        total = sum(weights)
        if not (total > 0 and all(math.isfinite(w) and w >= 0 for w in weights)):
            return "members sent invalid weights"
        error = WIRE_ERROR[self.compression]
        for c in range(n_chunks):
            expected = sum(w * p[c] for w, p in zip(weights, projections, strict=True)) / total
            scale = max(math.sqrt(max(q[c], 0.0)) for q in sq_norms) + math.sqrt(got.sq_norms[c])
            if not abs(got.projections[c] - expected) <= SIGMAS * error * scale + 1e-7 * (1 + abs(expected)):
                return f"incomplete round: chunk {c} of the average does not match the members' inputs"
        return None
