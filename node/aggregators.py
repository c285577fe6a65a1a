"""How a group turns its members' pseudo-gradients into one: the aggregators behind ``--aggregator``.

Each aggregator takes every accepted member's delta (``members × tensors``, members in the order of
their peer ids, so that every honest member computes the same result from the same inputs) and
returns one delta. They are pure, deterministic functions of their inputs (fp32 on the CPU).

- ``mean``: the mean weighted by the (capped) samples each member processed. Only used on hand-made
  inputs here: the group's ``mean`` rounds run hivemind's butterfly all-reduce, which computes it on
  the wire without any member seeing another's delta (:mod:`cogen.node.group`).
- ``trimmed_mean``: coordinate-wise, the ``b`` largest and ``b`` smallest values are dropped and
  the rest averaged, with ``b = ceil(n / 4)`` (at most ``(n - 1) // 2``): one hostile member in a
  group of 3 or 4 is trimmed in every coordinate. Unweighted: a claimed weight cannot buy influence.
- ``centered_clip``: CenteredClip (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine
  Robust Optimization"; the aggregator of BTARD, Gorbunov et al. 2022): starting from the
  coordinate-wise median ``v``, ``CLIP_ITERATIONS`` times ``v <- v + mean_i clip(x_i - v, tau)``
  where ``clip`` scales a vector down to L2 norm ``tau`` (over all tensors together) and ``tau`` is
  the median distance of the members from the starting point: a member far from the others moves
  the result by at most ``tau / n`` per iteration, whatever it sent. Unweighted, as trimmed_mean.

New aggregators register with :func:`register`; :func:`get_aggregator` raises on an unknown name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

Deltas = Sequence[Sequence[torch.Tensor]]  # members x tensors
CLIP_ITERATIONS = 3


class Aggregator(Protocol):
    """A rule that turns the members' deltas into one; ``weights`` are the capped sample counts."""

    name: str
    #: whether it needs every member's whole delta (False: the butterfly all-reduce computes it)
    needs_all_deltas: bool

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> list[torch.Tensor]: ...


_REGISTRY: dict[str, Aggregator] = {}


def register(aggregator: Aggregator) -> Aggregator:
    """Add ``aggregator`` under its name; a second one with the same name is an error."""
    if aggregator.name in _REGISTRY:
        raise ValueError(f"an aggregator named {aggregator.name!r} is already registered")
    _REGISTRY[aggregator.name] = aggregator
    return aggregator


def get_aggregator(name: str) -> Aggregator:
    """The aggregator registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def aggregator_names() -> list[str]:
    return sorted(_REGISTRY)


def _check(deltas: Deltas, weights: Sequence[float]) -> None:
    if not deltas:
        raise ValueError("no deltas to aggregate")
    if len(weights) != len(deltas):
        raise ValueError("one weight per member is needed")
    shapes = [t.shape for t in deltas[0]]
    if any([t.shape for t in d] != shapes for d in deltas):
        raise ValueError("the members' deltas do not have the same shapes")


def _stacked(deltas: Deltas, i: int) -> torch.Tensor:
    """Tensor ``i`` of every member, as one fp32 tensor ``members × ...``."""
    return torch.stack([d[i].float() for d in deltas])


class Mean:
    name = "mean"
    needs_all_deltas = False

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> list[torch.Tensor]:
        _check(deltas, weights)
        total = float(sum(weights))
        if not total > 0:
            raise ValueError("the weights must not all be zero")
        w = torch.tensor([float(x) / total for x in weights], dtype=torch.float32)
        out = []
        for i in range(len(deltas[0])):
            stacked = _stacked(deltas, i)
            out.append(torch.tensordot(w, stacked, dims=1))
        return out


def trim_count(n: int) -> int:
    """Values dropped at each end of a coordinate in a group of ``n``."""
    return min((n - 1) // 2, math.ceil(n / 4))


class TrimmedMean:
    name = "trimmed_mean"
    needs_all_deltas = True

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> list[torch.Tensor]:
        _check(deltas, weights)
        n, b = len(deltas), trim_count(len(deltas))
        out = []
        for i in range(len(deltas[0])):
            ordered = _stacked(deltas, i).sort(dim=0).values
            out.append(ordered[b : n - b].mean(dim=0))
        return out


def coordinate_median(deltas: Deltas) -> list[torch.Tensor]:
    """Coordinate-wise median (for an even count: the mean of the two middle values)."""
    out = []
    for i in range(len(deltas[0])):
        ordered = _stacked(deltas, i).sort(dim=0).values
        n = ordered.shape[0]
        out.append((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    return out


def _distance(x: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum((a.float() - b) ** 2)) for a, b in zip(x, v, strict=True)))


class CenteredClip:
    name = "centered_clip"
    needs_all_deltas = True

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> list[torch.Tensor]:
        _check(deltas, weights)
        v = coordinate_median(deltas)
        tau = _median([_distance(x, v) for x in deltas])
        if tau == 0:  # most members sent the median itself
            return v
        n = len(deltas)
        for _ in range(CLIP_ITERATIONS):
            scales = [min(1.0, tau / d) if d > 0 else 0.0 for d in (_distance(x, v) for x in deltas)]
            v = [
                vi + sum(s * (x[i].float() - vi) for s, x in zip(scales, deltas, strict=True)) / n
                for i, vi in enumerate(v)
            ]
        return v


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


for _aggregator in (Mean(), TrimmedMean(), CenteredClip()):
    register(_aggregator)
