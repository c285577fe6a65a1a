"""``ties``: trim each delta to its largest ``density`` fraction, elect a sign, average those that agree.

PEFT's ``merge_utils`` does the sign election and the disjoint merge. Its disjoint merge divides by the
number of experts that agree on a parameter's sign, so the weights are rescaled to average 1: with
equal weights a parameter gets the plain mean of the agreeing experts' values (TIES-Merging, Yadav et
al. 2023). The trim is cogen's: PEFT's ``magnitude_based_pruning`` sorts out the top-k entries with
``torch.topk``, which takes 80 % of a merge's time (bench/merging/cost.py); the k-th largest magnitude as
a threshold (``torch.kthvalue``) keeps the same entries (more only on exact ties) four times faster.
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from cogen.coordinator.merging.registry import MergeMethod, mean_to_one, register


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


class Ties(MergeMethod):
    name = "ties"

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        trimmed = torch.stack([trim(d, self.params.density) for d in deltas], dim=0)
        sign = merge_utils.calculate_majority_sign_mask(trimmed, method=self.params.majority_sign)
        weighted = trimmed * merge_utils.reshape_weight_task_tensors(trimmed, mean_to_one(weights))
        return merge_utils.disjoint_merge(weighted, sign)

    def describe(self) -> dict[str, float | int | str]:
        return {"density": self.params.density, "majority_sign": self.params.majority_sign}


register(Ties.name, Ties)
