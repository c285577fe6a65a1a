"""Screening a merge's experts: the cheap ranking every generation, the full evaluation as an audit.

:func:`screen` decides what a merge knows of its experts:

- with the nodes' prequential claims (``--claims``, written by the coordinator's generation loop), every
  expert's claims are spot-checked on its collected checkpoint within :data:`BUDGET_FRACTION` of a full
  evaluation's tokens (:mod:`.spotcheck`), then ranked by :func:`.prequential.prequential_ranking`;
  its weights (:func:`.prequential.cheap_weights`) are the default; an expert whose claims do not hold
  is ranked last and left out of the merge, whatever else weights it;
- the **full evaluation** (every expert on every domain: :func:`.ranking.rank_experts`) runs on audit
  generations only: 1, 1 + N, 1 + 2N, ... (``--full-eval-every N``), or always without claims (an
  offline merge). On an audit with claims, the two orders' agreement (Kendall tau, top-1) and the cost of
  each in forward-pass tokens are recorded (:class:`cogen.protocols.ranking.Agreement`);
- on every generation with ``eval_domains``, the base is evaluated (the merge is, after merging), so that
  the manifest's matrix and whatever gates a publish always have base and merge.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from torch import nn

from cogen.coordinator.claims import read_claims
from cogen.coordinator.config import MergeConfig
from cogen.coordinator.merging.evaluate import BlockLosses, block_losses, evaluate_blocks
from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.prequential import (
    agreement,
    estimate,
    evaluation_tokens,
    prequential_ranking,
)
from cogen.coordinator.merging.spotcheck import BUDGET_FRACTION, check_expert
from cogen.protocols.manifest import EvalMatrix
from cogen.protocols.ranking import Agreement, PrequentialRanking

logger = logging.getLogger(__name__)

__all__ = ["Screening", "is_audit", "screen"]


def is_audit(generation: int, every: int) -> bool:
    """Whether ``generation`` runs the full evaluation: 1, 1 + every, 1 + 2·every, ..."""
    return (generation - 1) % every == 0


@dataclass(frozen=True)
class Screening:
    model: nn.Module  # the base again (adapters taken off)
    matrix: EvalMatrix | None
    per_block: BlockLosses | None  # the full evaluation's block losses (None: no audit this generation)
    cheap: PrequentialRanking | None
    agreement_with: Any  # a function of the full ranking's order -> Agreement, or None

    def excluded(self) -> set[str]:
        """Experts whose claims did not hold: never merged."""
        return {e.expert for e in self.cheap.experts if e.flagged and e.checked} if self.cheap else set()


def _base_only(model: nn.Module, blocks: dict[str, Any]) -> EvalMatrix:
    base = block_losses(model, blocks)
    return EvalMatrix(
        domains=list(blocks), tokens_per_domain={d: int(b.numel()) for d, b in blocks.items()},
        base={d: sum(v) / len(v) for d, v in base.items()}, experts={},
    )  # fmt: skip


def screen(
    cfg: MergeConfig, model: nn.Module, experts: list[Expert], tokenizer: Any, blocks: dict[str, Any],
    generation: int, rng: random.Random | None = None,
) -> Screening:  # fmt: skip
    """The cheap ranking and, on an audit, the full evaluation (see the module)."""
    claims = read_claims(cfg.claims) if cfg.claims is not None else None
    audit = claims is None or is_audit(generation, cfg.eval.full_eval_every)
    full_tokens = evaluation_tokens(len(experts) + 2, max(1, len(blocks)), cfg.eval.eval_blocks,
                                    cfg.eval.eval_block_size)  # fmt: skip
    cheap = None
    if claims is not None:
        rng = rng or random.SystemRandom()  # nodes cannot know which batches will be checked
        per_expert = int(BUDGET_FRACTION * full_tokens) // max(1, len(experts))
        flagged, checked, estimates, spent = {}, {}, {}, 0
        for expert in experts:
            mine = claims.experts.get(expert.metadata.expert, [])
            estimates[expert.label] = estimate(expert.label, mine)
            model, result = check_expert(model, expert.path, mine, tokenizer, per_expert, rng)
            spent += result.tokens
            checked[expert.label] = result.checked
            if result.failed is not None:
                flagged[expert.label] = result.failed
                logger.warning("%s: its prequential claims do not hold (%s): ranked last, not merged",
                               expert.label, result.failed)  # fmt: skip
        cheap = prequential_ranking(estimates, flagged=flagged, checked=checked, cost_tokens=spent)
    matrix, per_block = None, None
    if blocks and audit:
        model, matrix, per_block = evaluate_blocks(model, experts, blocks)
    elif blocks:
        matrix = _base_only(model, blocks)
    agree = None
    if cheap is not None and per_block is not None:
        order = [e.expert for e in cheap.experts]
        spent_cheap = cheap.cost_tokens

        def agree(full_order: list[str]) -> Agreement:
            return agreement(order, full_order, spent_cheap, full_tokens)

    return Screening(model, matrix, per_block, cheap, agree)
