"""``ties``: trim each delta to its largest ``density`` fraction, elect a sign, average those that agree.

PEFT's ``merge_utils.ties`` does the work. Its disjoint merge divides by the number of experts that agree
on a parameter's sign, so the weights are rescaled to average 1: with equal weights a parameter gets the
plain mean of the agreeing experts' values (TIES-Merging, Yadav et al. 2023).
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from cogen.coordinator.merging.registry import MergeMethod, mean_to_one, register


class Ties(MergeMethod):
    name = "ties"

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        return merge_utils.ties(
            deltas, mean_to_one(weights), self.params.density, majority_sign_method=self.params.majority_sign
        )

    def describe(self) -> dict[str, float | int | str]:
        return {"density": self.params.density, "majority_sign": self.params.majority_sign}


register(Ties.name, Ties)
