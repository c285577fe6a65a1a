"""``dare`` and ``dare_ties``: drop each delta's entries at random, rescale by ``1/density``, then merge.

PEFT's ``merge_utils.dare_linear`` / ``dare_ties`` draw their masks with ``torch.bernoulli`` from the
global generator. cogen makes them reproducible: each module is merged under ``torch.random.fork_rng``
seeded with :func:`module_seed` (a hash of the seed and the module's name), so the result depends on
neither the order modules are visited in nor anything else that used the generator before.
``dare`` rescales the weights to sum to 1 (like ``linear``); ``dare_ties`` merges the survivors with
``ties``' weighted, convex disjoint mean (:func:`cogen.coordinator.merging.ties.disjoint_mean`).
The masks are reproducible for a given seed on a given device type (CPU and CUDA draw differently).
(DARE: Yu et al. 2024, "Language Models are Super Mario".)
"""

from __future__ import annotations

import hashlib

import torch
from peft.utils import merge_utils

from cogen.coordinator.merging.registry import MergeMethod, register, sum_to_one
from cogen.coordinator.merging.ties import disjoint_mean


def module_seed(seed: int, module: str) -> int:
    """The seed of ``module``'s random drops: 63 bits of sha256 over the merge seed and module name."""
    digest = hashlib.sha256(f"cogen-dare\x00{seed}\x00{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Dare(MergeMethod):
    name = "dare"

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        # fork every generator manual_seed touches, so that a merge leaves the global state as it was
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(module_seed(self.params.seed, module))
            return self._drop_and_merge(deltas, weights)

    def _drop_and_merge(self, deltas: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        return merge_utils.dare_linear(deltas, sum_to_one(weights), self.params.density)

    def describe(self) -> dict[str, float | int | str]:
        return {"density": self.params.density, "seed": self.params.seed}


class DareTies(Dare):
    name = "dare_ties"

    def _drop_and_merge(self, deltas: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        # PEFT's drops, in PEFT's order (the masks equal merge_utils.dare_ties'); cogen's weighted mean
        kept = [merge_utils.prune(d, self.params.density, method="random", rescale=True) for d in deltas]
        return disjoint_mean(torch.stack(kept, dim=0), weights, self.params.majority_sign)

    def describe(self) -> dict[str, float | int | str]:
        return {**super().describe(), "majority_sign": self.params.majority_sign}


register(Dare.name, Dare)
register(DareTies.name, DareTies)
