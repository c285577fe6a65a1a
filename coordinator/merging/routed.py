"""The mixture a merge builds beside its dense base: the experts behind the trained per-sequence router
or PEFT's zero-shot Arrow router (``--mixture-routing``), evaluated on the merge's blocks, and which of
the two models — mixture or dense merge — is the generation's best (the manifest's ``best``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogen.coordinator.config import MergeConfig
from cogen.coordinator.merging import moe
from cogen.coordinator.merging.evaluate import losses
from cogen.coordinator.merging.experts import Expert
from cogen.core.corpora import known_domains
from cogen.protocols.manifest import BestModel, EvalMatrix

__all__ = ["Routed", "best_model", "build_routed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routed:
    """The mixture of a merge: its experts, router (trained, or Arrow's options), losses and, for a
    trained router, its routing accuracy."""

    experts: list[Expert]
    router: moe.Router | moe.ArrowOptions
    losses: dict[str, float | None]
    accuracy: float | None
    hidden_size: int


def build_routed(
    cfg: MergeConfig, base: nn.Module, tokenizer: Any, experts: list[Expert], blocks: dict[str, torch.Tensor]
) -> tuple[nn.Module, Routed | None]:
    """Build the mixture (``cfg.moe.mixture_routing``: train the router on each expert's domain, training
    split, or Arrow's zero-shot one), evaluate it on ``blocks``; returns the base with the adapters taken
    off again. One expert per domain (the first); a mixture needs two domains with data."""
    by_domain: dict[str, Expert] = {}
    for expert in experts:
        if expert.metadata.expert in known_domains():
            by_domain.setdefault(expert.metadata.expert, expert)
    chosen = list(by_domain.values())
    if len(chosen) < 2:
        logger.info("no routed mixture: it needs experts of two or more known domains")
        return base, None
    hidden = int(getattr(getattr(base, "config", None), "hidden_size", 0) or 0)
    router: moe.Router | moe.ArrowOptions
    mixture: moe.RoutedMixture | moe.ArrowMixture
    accuracy = None
    if cfg.moe.mixture_routing == moe.ARROW:
        router = moe.ArrowOptions(cfg.moe.arrow_top_k, cfg.moe.arrow_temperature, cfg.merge.seed)
        mixture = moe.build_arrow(base, chosen, router)
        mixture_losses = losses(mixture, blocks)
        logger.info("Arrow mixture (top %d of %d per token): losses %s", mixture.top_k, len(chosen),
                    mixture_losses)  # fmt: skip
    else:
        examples = moe.training_blocks(
            list(by_domain), tokenizer, cfg.eval.eval_block_size, cfg.moe.router_blocks
        )
        router = moe.train_router(base, {e.label: examples[e.metadata.expert] for e in chosen})
        mixture = moe.build_mixture(base, chosen, router)
        mixture_losses = losses(mixture, blocks)
        held_out = {by_domain[d].label: b for d, b in blocks.items() if d in by_domain}
        accuracy = moe.route(mixture, held_out).accuracy
        logger.info("routed mixture: routing accuracy %.2f, losses %s", accuracy, mixture_losses)
    peft_model: Any = mixture.model
    return peft_model.unload(), Routed(chosen, router, mixture_losses, accuracy, hidden)


def best_model(mixture: Routed, matrix: EvalMatrix, directory: str) -> BestModel:
    """The routed mixture (published in ``directory``) or the dense merge, whichever has the lower mean
    loss over the domains."""
    dense = matrix.merged or {}

    def mean(values: dict[str, float | None]) -> float:
        finite = [v for v in values.values() if v is not None and math.isfinite(v)]
        return sum(finite) / len(finite) if len(finite) == len(values) and finite else math.inf

    better = mean(mixture.losses) < mean(dense)
    return BestModel(
        kind="moe" if better else "dense", path=directory if better else "", losses=mixture.losses,
        dense_losses=dense, routing_accuracy=mixture.accuracy,
    )  # fmt: skip
