"""Outer-gradient compression beyond 8-bit: per-chunk top-k with low-bit values and error feedback.

SparseLoCo-style: each member adds its *error buffer* (what it did not send last time) to its
pseudo-gradient, keeps in every chunk of ``chunk`` values only the ``k`` largest in magnitude,
quantises those to ``bits`` bits (symmetric, one fp32 scale per chunk), and keeps the rest (the
values left out and the quantisation error) as the next round's error buffer. Nothing is lost: what
is not sent now is sent later.

Composing with hivemind's all-reduce, which averages tensors of one layout on every member: the
indices each member picks differ, so they are not averaged directly. The plan (not yet wired into
:class:`~cogen.node.group.GroupAverager`): a first small round averages per-chunk scores
(:meth:`SparseCompressor.scores`), every member selects the same chunks from that average
(:func:`shared_chunks`), and the selected chunks' values then go through the all-reduce, so the
round checks of :mod:`cogen.node.wire` apply to that dense tensor unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def __init__(self, shapes: list[torch.Size], chunk: int = 4096, k: int = 64, bits: int = 2):
        if chunk < 1 or not 1 <= k <= chunk:
            raise ValueError(f"need 1 <= k <= chunk, got k={k}, chunk={chunk}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.chunk, self.k, self.bits = chunk, k, bits
        self.shapes = list(shapes)
        self.error = [torch.zeros(s, dtype=torch.float32) for s in self.shapes]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = (-flat.numel()) % self.chunk
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, self.chunk)

    def compress(self, delta: list[torch.Tensor]) -> list[Sent]:
        """Encode ``delta`` plus the error buffer; the buffer becomes what was not sent."""
        if [t.shape for t in delta] != self.shapes:
            raise ValueError("the pseudo-gradient does not match the compressor's shapes")
        top = 2 ** (self.bits - 1) - 1
        out = []
        for i, d in enumerate(delta):
            full = d.detach().float().cpu() + self.error[i]
            rows = self._rows(full)
            idx = rows.abs().topk(self.k, dim=1).indices
            vals = rows.gather(1, idx)
            scales = vals.abs().amax(dim=1).clamp_min(1e-30)
            codes = (vals / scales[:, None] * top).round().clamp(-top, top).to(torch.int8)
            sent = Sent(idx, codes, scales, full.numel())
            self.error[i] = full - self.decode(sent).view(full.shape)
            out.append(sent)
        return out

    def decode(self, sent: Sent) -> torch.Tensor:
        """The dense flat tensor that ``sent`` stands for."""
        top = 2 ** (self.bits - 1) - 1
        rows = torch.zeros(sent.indices.shape[0], self.chunk, dtype=torch.float32)
        rows.scatter_(1, sent.indices, sent.codes.float() * (sent.scales[:, None] / top))
        return rows.reshape(-1)[: sent.numel]

    def scores(self, delta: list[torch.Tensor]) -> torch.Tensor:
        """Per chunk of all tensors (in order), the squared norm of delta plus error: what a first
        small round averages to choose the chunks every member sends."""
        return torch.cat(
            [
                self._rows(d.detach().float().cpu() + e).pow(2).sum(1)
                for d, e in zip(delta, self.error, strict=True)
            ]
        )


def shared_chunks(averaged_scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` chunks with the largest averaged score, sorted: the same on every member that
    decoded the same average."""
    if averaged_scores.ndim != 1 or not bool(torch.isfinite(averaged_scores).all()):
        raise ValueError("chunk scores must be a finite 1-d tensor")
    n = min(n, averaged_scores.numel())
    return averaged_scores.topk(n).indices.sort().values
