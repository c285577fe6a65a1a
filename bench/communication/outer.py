"""The group's outer step for the communication benchmark, through cogen's real wire format.

Pseudo-gradients go through hivemind's ``compress`` and ``deserialize_torch_tensor`` as the butterfly
all-reduce sends them, and the anchor moves by ``GroupAverager._apply`` itself, so the benchmark measures
cogen's algorithm and bytes rather than a copy of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor

from cogen.core.config import GroupConfig
from cogen.node.group import GroupAverager


def wire_trip(
    tensors: Sequence[torch.Tensor], compression: CompressionBase
) -> tuple[list[torch.Tensor], int]:
    """Each tensor compressed as hivemind sends it and decoded again; also the serialized bytes."""
    out, size = [], 0
    for key, t in enumerate(tensors):
        message = compression.compress(t.contiguous(), CompressionInfo.from_tensor(t, key=key))
        size += len(message.buffer)
        out.append(deserialize_torch_tensor(message).to(torch.float32).reshape(t.shape))
    return out, size


def average_on_wire(
    deltas: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], compression: CompressionBase
) -> tuple[list[torch.Tensor], int]:
    """What the butterfly all-reduce delivers: the sample-weighted mean of the decoded deltas, itself
    sent back through the wire format. Also the serialized bytes one member's delta took."""
    decoded, sizes = zip(*(wire_trip(d, compression) for d in deltas), strict=True)
    total = float(sum(weights))
    mean = [
        sum((w / total) * member[i] for w, member in zip(weights, decoded, strict=True))
        for i in range(len(deltas[0]))
    ]
    averaged, _ = wire_trip(cast(list[torch.Tensor], mean), compression)
    return averaged, int(max(sizes))


class OuterState:
    """The group's shared anchor and outer momentum, shaped so that ``GroupAverager._apply`` runs on it
    unchanged (``cfg``, ``anchor``, ``params`` and ``state_averager.get_tensors()``)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], cfg: GroupConfig):
        self.cfg = cfg
        self.params = list(params)
        with torch.no_grad():
            self.anchor = [p.detach().float().clone() for p in self.params]
            self.momentum = [torch.zeros_like(a) for a in self.anchor]
        self.state_averager = self

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        yield [*self.anchor, *self.momentum]

    def pseudo_gradient(self, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
        """``anchor - weights``, as ``GroupAverager.begin_round`` computes it."""
        return [a - p.detach().float() for a, p in zip(self.anchor, params, strict=True)]

    @torch.no_grad()
    def apply(
        self,
        delta_avg: Sequence[torch.Tensor],
        lr: float,
        momentum: float,
        progress: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """cogen's outer step, by cogen's own code: Nesterov SGD on the anchor, weights := anchor
        (plus ``progress``, the inner steps made while an overlapped round ran)."""
        self.cfg = self.cfg.model_copy(update={"outer_lr": lr, "outer_momentum": momentum})
        GroupAverager._apply(cast(GroupAverager, self), delta_avg, progress)
