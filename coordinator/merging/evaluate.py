"""The evaluation matrix of a merge: validation loss of the base, each expert and the merge per domain.

:func:`evaluate_blocks` also keeps each model's loss on every validation block (:class:`BlockLosses`),
which the ranking's bootstrap resamples; a domain's loss in the matrix is the mean of its block losses,
which equals :func:`cogen.core.evaluation.validation_loss` on the same blocks (every block predicts the same
number of tokens).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.registry import MergeError
from cogen.core.checkpoint import load_adapter
from cogen.core.corpora import get_corpus
from cogen.core.data import validation_blocks
from cogen.core.evaluation import validation_loss
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


@torch.no_grad()
def block_losses(
    model: nn.Module, blocks: dict[str, torch.Tensor], batch_size: int = 8
) -> dict[str, list[float]]:
    """``model``'s mean next-token loss on each block ``[n, T]`` of each domain (one forward per batch)."""
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    out: dict[str, list[float]] = {}
    try:
        for domain, tokens in blocks.items():
            if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
                raise ValueError(f"{domain}: expected non-empty [n, T>=2] blocks, got {tuple(tokens.shape)}")
            per_block: list[float] = []
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                per_block.extend(token_loss.view_as(targets).mean(dim=1).tolist())
            out[domain] = per_block
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class BlockLosses:
    """Per-block losses behind an :class:`EvalMatrix`: what the ranking's bootstrap resamples."""

    base: dict[str, list[float]]  #: domain -> the base's loss on each block
    experts: dict[str, dict[str, list[float]]] = field(default_factory=dict)  #: expert -> domain -> ...


def _mean(values: list[float]) -> float | None:
    mean = math.fsum(values) / len(values)
    return mean if math.isfinite(mean) else None


def _means(per_block: dict[str, list[float]]) -> dict[str, float | None]:
    return {domain: _mean(values) for domain, values in per_block.items()}


def evaluate_blocks(
    base: nn.Module, experts: list[Expert], blocks: dict[str, torch.Tensor]
) -> tuple[nn.Module, EvalMatrix, BlockLosses]:
    """Like :func:`evaluate_experts`, and also every model's per-block losses (no extra forward pass)."""
    base_blocks = block_losses(base, blocks)
    logger.info("base: %s", _fmt(_means(base_blocks)))
    expert_blocks: dict[str, dict[str, list[float]]] = {}
    for expert in experts:
        with_adapter = load_adapter(base, expert.path)
        expert_blocks[expert.label] = block_losses(with_adapter, blocks)
        base = with_adapter.unload()  # take the adapter off again: the base weights are untouched
        logger.info("%s: %s", expert.label, _fmt(_means(expert_blocks[expert.label])))
    matrix = EvalMatrix(
        domains=list(blocks),
        tokens_per_domain={d: int(b.numel()) for d, b in blocks.items()},
        base=_means(base_blocks),
        experts={label: _means(per_block) for label, per_block in expert_blocks.items()},
    )
    return base, matrix, BlockLosses(base=base_blocks, experts=expert_blocks)


def evaluate_experts(
    base: nn.Module, experts: list[Expert], blocks: dict[str, torch.Tensor]
) -> tuple[nn.Module, EvalMatrix]:
    """Losses of the base and of base + each expert's adapter; returns the base (adapters removed)."""
    base, matrix, _ = evaluate_blocks(base, experts, blocks)
    return base, matrix


def _fmt(values: dict[str, float | None]) -> str:
    return ", ".join(f"{d} {v:.4f}" if v is not None else f"{d} n/a" for d, v in values.items())
