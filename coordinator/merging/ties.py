"""``ties``: trim each delta to its largest ``density`` fraction, elect a sign, average those that agree.

The disjoint merge is weighted and stays convex (:func:`disjoint_mean`): each parameter's sign is
elected on the weighted deltas, and the weighted sum of the experts that agree with it is divided by
*their* weight sum — mergekit's generalized task arithmetic. (PEFT's ``disjoint_merge`` divides by
the number of agreeing experts instead: where only a heavily weighted expert agrees, its value is
amplified beyond anything an expert learned.) With equal weights a parameter gets the plain mean of
the agreeing experts' values (TIES-Merging, Yadav et al. 2023). The trim is cogen's: PEFT's
``magnitude_based_pruning`` sorts out the top-k entries with ``torch.topk``, which takes 80 % of a
merge's time (bench/merging/cost.py); the k-th largest magnitude as a threshold (``torch.kthvalue``)
keeps the same entries (more only on exact ties) four times faster.
"""

from __future__ import annotations

from typing import Literal

import torch

from cogen.coordinator.merging.registry import MergeMethod, register


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of largest magnitudes set to 0."""
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    if k >= delta.numel():
        return delta
    magnitude = delta.abs()
    threshold = magnitude.reshape(-1).kthvalue(delta.numel() - k + 1).values
    return delta * (magnitude >= threshold)


def disjoint_mean(
    deltas: torch.Tensor, weights: torch.Tensor, majority_sign: Literal["total", "frequency"]
) -> torch.Tensor:
    """Per parameter, the weighted mean of the (stacked) ``deltas`` whose sign agrees with the elected one.

    The sign is that of the weighted deltas' sum (``total``) or of the count of their signs
    (``frequency``), ties counting as positive; a zero (trimmed or dropped) value agrees with nothing.
    The result is a convex combination of agreeing values: never larger than the largest of them.
    """
    w = weights.to(deltas.dtype).reshape(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas * w
    sign = weighted.sign()
    votes = weighted.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    total = (weighted * agree).sum(dim=0)
    weight = (w * agree).sum(dim=0)
    return torch.where(weight > 0, total / torch.where(weight > 0, weight, 1.0), 0.0)


class Ties(MergeMethod):
    name = "ties"

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        trimmed = torch.stack([trim(d, self.params.density) for d in deltas], dim=0)
        return disjoint_mean(trimmed, weights, self.params.majority_sign)

    def describe(self) -> dict[str, float | int | str]:
        return {"density": self.params.density, "majority_sign": self.params.majority_sign}


register(Ties.name, Ties)
