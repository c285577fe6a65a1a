"""``linear``: weighted task arithmetic, the weighted mean of the deltas (PEFT ``task_arithmetic``)."""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from cogen.coordinator.merging.registry import MergeMethod, register, sum_to_one


class Linear(MergeMethod):
    """``Σ wᵢ ΔWᵢ`` with the weights rescaled to sum to 1 (equal weights: the mean delta)."""

    name = "linear"

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        return merge_utils.task_arithmetic(deltas, sum_to_one(weights))


register(Linear.name, Linear)
