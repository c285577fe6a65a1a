"""The group's wire: hivemind compression of pseudo-gradients, and checking what a round returned.

hivemind's all-reduce can return a partial average without raising (a part that did not arrive or
did not decode stays local). So every member sends, through the round's all-gather, a random ±1
projection and the squared norm of each chunk of its pseudo-gradient (:meth:`RoundVerifier.checks`);
after the round :meth:`RoundVerifier.verify` checks that each chunk of the result projects to the
weighted mean of the members' projections, within what the wire format can explain.

The projections are taken on a fixed sample, not on every value, so that the checks cost little
next to the all-reduce at any model size: the concatenated tensors are cut into windows of
``SAMPLE_BLOCK * k`` values and one seeded block of ``SAMPLE_BLOCK`` values is taken from each
window (``k = 1``, everything, up to ``SAMPLE_MAX`` values). hivemind's parts are contiguous slices
of the flattened tensors (of 2^19 bytes on the wire, at least 2^17 values), so a part left local
covers whole windows and weighs in its chunks' sample as much as in the chunks themselves.
Finiteness is the one thing a sample cannot vouch for: it is checked on every value, in one pass.

The probe and the sample positions are drawn anew for every round from :func:`round_seed`, a hash of
all members' nonces, and a member reveals its nonce and its projections only after its all-reduce
finished (:mod:`cogen.node.rounds`). Each member committed to its nonce (a sha256 in the round's
all-gather) before any nonce was revealed, so no member, not even the last one to reveal, can choose
the seed, and when the seed becomes known every member's contribution to the average is already
fixed: a delta cannot be shaped to pass a probe it could not know.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
)

MIN_CHUNK = 16384  # values per verified chunk of the delta, at least
MAX_CHUNKS = 512  # at most: the all-gather must stay small (hivemind passes it through a pipe; messages
#                  over 16 KB can be read half-written and kill the averager's command loop)
SAMPLE_BLOCK = 64  # values per sampled block (256 B of fp32: whole cache lines)
SAMPLE_MAX = 1 << 21  # values checked per round, about (8 MB of fp32): every value below that
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


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value is finite, in one read pass without a tensor-sized temporary: a NaN or
    an Inf anywhere makes the sum non-finite; a sum that overflowed is confirmed value by value."""
    return all(math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class RoundChecks:
    """What a member sends about its pseudo-gradient: per chunk, a projection and a squared norm."""

    projections: list[float]
    sq_norms: list[float]


def round_seed(nonces: Sequence[bytes]) -> int:
    """The probe seed of a round: a hash of every member's nonce (in the members' peer-id order)."""
    digest = hashlib.sha256(b"".join(hashlib.sha256(n).digest() for n in nonces)).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Probe:
    """One round's sample positions and ±1 probe (from :func:`round_seed`)."""

    cuts: list[int]  # tensor i's sampled positions are index[cuts[i]:cuts[i + 1]] of the concatenation
    index: list[torch.Tensor]  # per tensor, the sampled positions inside it (int32)
    signs: torch.Tensor  # chunks x values per chunk, float64 ±1
    sampled: int

    @property
    def n_chunks(self) -> int:
        return int(self.signs.shape[0])


class RoundVerifier:
    """Chunk probes for one model's deltas; each round draws its own (:meth:`probe`)."""

    def __init__(self, tensors: Sequence[torch.Tensor], compression: str):
        self.compression = compression
        self.shapes = [t.shape for t in tensors]
        self._sizes = torch.tensor([0, *[t.numel() for t in tensors]], dtype=torch.int64).cumsum(0)
        self.total = int(self._sizes[-1])
        self._k = max(1, math.ceil(self.total / SAMPLE_MAX))  # one block in k is checked
        window = SAMPLE_BLOCK * self._k
        chunk = max(MIN_CHUNK, math.ceil(self.total / MAX_CHUNKS))
        self._per_chunk = math.ceil(chunk / window) * SAMPLE_BLOCK  # sampled values per chunk

    def probe(self, seed: int) -> Probe:
        """The sample and the probe of the round whose seed is ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        window = SAMPLE_BLOCK * self._k
        n_windows = math.ceil(self.total / window)
        phases = torch.randint(0, self._k, (n_windows,), generator=gen) * SAMPLE_BLOCK
        starts = torch.arange(n_windows, dtype=torch.int64) * window + phases
        index = (starts[:, None] + torch.arange(SAMPLE_BLOCK)).reshape(-1)
        index = index[index < self.total]  # only the last window can be cut short: chunks stay aligned
        cuts = torch.searchsorted(index, self._sizes).tolist()
        per_tensor = [
            (index[lo:hi] - self._sizes[i]).to(torch.int32)
            for i, (lo, hi) in enumerate(itertools.pairwise(cuts))
        ]
        n_chunks = math.ceil(index.numel() / self._per_chunk)
        signs = torch.randint(0, 2, (n_chunks, self._per_chunk), generator=gen, dtype=torch.float64)
        # float64: a mixed-dtype product would be 6x slower; the last chunk's padding meets zeros
        return Probe(cuts, per_tensor, signs * 2 - 1, index.numel())

    def _rows(self, tensors: Sequence[torch.Tensor], probe: Probe) -> torch.Tensor:
        """The sample of ``tensors`` in float64, one row per chunk (the last one padded with zeros)."""
        if len(tensors) != len(self.shapes) or any(
            t.shape != s for t, s in zip(tensors, self.shapes, strict=True)
        ):
            raise ValueError("the tensors do not match the model this verifier was built for")
        per_chunk = probe.signs.shape[1]
        rows = torch.zeros(probe.n_chunks * per_chunk, dtype=torch.float64)
        for t, i, (lo, hi) in zip(tensors, probe.index, itertools.pairwise(probe.cuts), strict=True):
            rows[lo:hi] = t.detach().reshape(-1).index_select(0, i.to(t.device)).cpu()
        return rows.view(probe.n_chunks, per_chunk)

    def checks(self, delta: Sequence[torch.Tensor], probe: Probe) -> RoundChecks:
        """Per chunk of the delta: the projection of its sample on the probe, and the sample's squared
        norm (non-finite if a sampled value is; :func:`all_finite` looks at every value)."""
        rows = self._rows(delta, probe)
        projections = torch.einsum("ij,ij->i", rows, probe.signs)
        sq_norms = torch.einsum("ij,ij->i", rows, rows)
        return RoundChecks(projections.tolist(), sq_norms.tolist())

    def verify(
        self,
        averaged: Sequence[torch.Tensor],
        weights: Sequence[float],
        members: Sequence[RoundChecks],
        probe: Probe,
    ) -> str | None:
        """``None`` if ``averaged`` is the ``weights``-weighted mean of the deltas whose checks the
        members revealed (``members``, under ``probe``), else why not."""
        if not all_finite(averaged):
            return "the average is not finite: a member sent NaN/Inf"
        got = self.checks(averaged, probe)
        n_chunks = len(got.projections)
        if len(weights) != len(members) or any(
            len(m.projections) != n_chunks or len(m.sq_norms) != n_chunks for m in members
        ):
            return "a member's round metadata does not match this model"
        total = sum(weights)
        if not (total > 0 and all(math.isfinite(w) and w >= 0 for w in weights)):
            return "members sent invalid weights"
        error = WIRE_ERROR[self.compression]
        for c in range(n_chunks):
            expected = sum(w * m.projections[c] for w, m in zip(weights, members, strict=True)) / total
            scale = max(math.sqrt(max(m.sq_norms[c], 0.0)) for m in members) + math.sqrt(got.sq_norms[c])
            if not abs(got.projections[c] - expected) <= SIGMAS * error * scale + 1e-7 * (1 + abs(expected)):
                return f"incomplete round: chunk {c} of the average does not match the members' inputs"
        return None
