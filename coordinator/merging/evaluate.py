"""The evaluation matrix of a merge: validation loss of the base, each expert and the merge per domain."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from cogen.checkpoint import load_adapter
from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.registry import MergeError
from cogen.corpora import get_corpus
from cogen.data import validation_blocks
from cogen.evaluation import validation_loss
from cogen.protocols.manifest import EvalMatrix

logger = logging.getLogger(__name__)


def domain_blocks(
    domains: tuple[str, ...] | list[str], tokenizer: Any, block_size: int, max_blocks: int
) -> dict[str, torch.Tensor]:
    """The first ``max_blocks`` validation blocks of each domain (the same on every machine)."""
    blocks = {}
    for domain in domains:
        try:
            blocks[domain] = validation_blocks(
                get_corpus(domain), tokenizer, block_size=block_size, max_blocks=max_blocks
            )
        except ValueError as e:
            raise MergeError(f"cannot evaluate on {domain!r}: {e}") from None
    return blocks


def _loss(model: nn.Module, blocks: torch.Tensor) -> float | None:
    loss = validation_loss(model, blocks)
    return loss if math.isfinite(loss) else None


def losses(model: nn.Module, blocks: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """``model``'s loss on each domain's blocks (``None`` where it is not finite)."""
    return {domain: _loss(model, b) for domain, b in blocks.items()}


def evaluate_experts(
    base: nn.Module, experts: list[Expert], blocks: dict[str, torch.Tensor]
) -> tuple[nn.Module, EvalMatrix]:
    """Losses of the base and of base + each expert's adapter; returns the base (adapters removed)."""
    base_losses = losses(base, blocks)
    logger.info("base: %s", _fmt(base_losses))
    expert_losses = {}
    for expert in experts:
        with_adapter = load_adapter(base, expert.path)
        expert_losses[expert.label] = losses(with_adapter, blocks)
        base = with_adapter.unload()  # take the adapter off again: the base weights are untouched
        logger.info("%s: %s", expert.label, _fmt(expert_losses[expert.label]))
    matrix = EvalMatrix(
        domains=list(blocks),
        tokens_per_domain={d: int(b.numel()) for d, b in blocks.items()},
        base=base_losses,
        experts=expert_losses,
    )
    return base, matrix


def _fmt(values: dict[str, float | None]) -> str:
    return ", ".join(f"{d} {v:.4f}" if v is not None else f"{d} n/a" for d, v in values.items())
