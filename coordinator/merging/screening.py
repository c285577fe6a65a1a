"""Screening a merge's experts: the cheap ranking every generation, the full evaluation as an audit.

:func:`screen` decides what a merge knows of its experts:

- with the nodes' prequential claims (``--claims``, written by the coordinator's generation loop), every
  expert's claims are spot-checked on its collected checkpoint within :data:`BUDGET_FRACTION` of a full
  evaluation's tokens (:mod:`.spotcheck`), then ranked by :func:`.prequential.prequential_ranking`;
  its weights (:func:`.prequential.cheap_weights`) are the default; an expert whose claims do not hold
  is ranked last and left out of the merge, whatever else weights it; so is an expert of a known domain
  whose claims are losses on another corpus (a node training on the wrong data);
- the **full evaluation** (every expert on every domain: :func:`.ranking.rank_experts`) runs on audit
  generations only: 1, 1 + N, 1 + 2N, ... (``--full-eval-every N``), or always without claims (an
  offline merge). On an audit with claims, the two orders' agreement (Kendall tau, top-1) and the cost of
  each in forward-pass tokens are recorded (:class:`cogen.protocols.ranking.Agreement`);
- the full evaluation also runs, and weighs the merge, on a generation where some expert that passed
  its spot-check has no usable claim (no member started from the base, or too few batches): the cheap
  ranking would give it weight 0 and the merge would drop what it learned (``Screening.fallback``);
- on every generation with ``eval_domains``, the base is evaluated (the merge is, after merging), so that
  the manifest's matrix and whatever gates a publish always have base and merge.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
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
from cogen.protocols.prequential import Prequential
from cogen.protocols.ranking import Agreement, PrequentialRanking

logger = logging.getLogger(__name__)

__all__ = ["Screening", "is_audit", "rank_claims", "screen"]


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
    failed: dict[str, str]  # experts whose claims did not hold, and why: never merged
    fallback: str | None = None  # why the full evaluation ran on a generation that is not an audit
    base_blocks: dict[str, list[float]] | None = None  # the base's per-block losses (what the gate pairs)

    def excluded(self) -> set[str]:
        """Experts whose claims did not hold: never merged."""
        return set(self.failed)

    def weighs(self) -> bool:
        """Whether the cheap ranking weighs the merge: every expert it does not exclude has a usable claim."""
        if self.cheap is None:
            return False
        return all(e.score is not None for e in self.cheap.experts if e.expert not in self.failed)


def _base_only(model: nn.Module, blocks: dict[str, Any]) -> tuple[dict[str, list[float]], EvalMatrix]:
    base = block_losses(model, blocks)
    return base, EvalMatrix(
        domains=list(blocks), tokens_per_domain={d: int(b.numel()) for d, b in blocks.items()},
        base={d: sum(v) / len(v) for d, v in base.items()}, experts={},
    )  # fmt: skip


def _off_domain(domain: str | None, claims: list[Prequential]) -> str | None:
    """Why an expert of a known ``domain`` claims losses on other data (None: it does not)."""
    if domain is None:
        return None  # an expert on its own corpus: nothing to compare its stream with
    other = sorted({c.stream.corpus for c in claims} - {domain})
    return f"its claims are losses on {other[0]!r}, not on its domain {domain!r}" if other else None


def rank_claims(
    model: nn.Module, experts: list[Expert], claims: Mapping[str, list[Prequential]],
    domains: Mapping[str, str | None], tokenizer: Any, budget_tokens: int, rng: random.Random,
) -> tuple[nn.Module, PrequentialRanking, dict[str, str]]:  # fmt: skip
    """Spot-check and rank the experts' claims (``claims[label]``; ``domains[label]``: the known domain it
    trains, None: unknown) within ``budget_tokens`` in all; returns the base, the cheap ranking and the
    experts whose claims do not hold, with why."""
    per_expert = budget_tokens // max(1, len(experts))
    flagged: dict[str, str] = {}
    checked, estimates, spent = {}, {}, 0
    for expert in experts:
        mine = claims.get(expert.label, [])
        estimates[expert.label] = estimate(expert.label, mine)
        model, result = check_expert(model, expert.path, mine, tokenizer, per_expert, rng)
        spent += result.tokens
        checked[expert.label] = result.checked
        failed = result.failed or _off_domain(domains.get(expert.label), mine)
        if failed is not None:
            flagged[expert.label] = failed
            logger.warning("%s: its prequential claims do not hold (%s): ranked last, not merged",
                           expert.label, failed)  # fmt: skip
    return model, prequential_ranking(estimates, flagged=flagged, checked=checked, cost_tokens=spent), flagged


def screen(
    cfg: MergeConfig, model: nn.Module, experts: list[Expert], tokenizer: Any, blocks: dict[str, Any],
    generation: int, rng: random.Random | None = None,
) -> Screening:  # fmt: skip
    """The cheap ranking and, on an audit, the full evaluation (see the module)."""
    claims = read_claims(cfg.claims) if cfg.claims is not None else None
    audit = claims is None or is_audit(generation, cfg.eval.full_eval_every)
    full_tokens = evaluation_tokens(len(experts) + 2, max(1, len(blocks)), cfg.eval.eval_blocks,
                                    cfg.eval.eval_block_size)  # fmt: skip
    cheap: PrequentialRanking | None = None
    flagged: dict[str, str] = {}
    started = time.monotonic()
    if claims is not None:
        by_label = {e.label: claims.experts.get(e.metadata.expert, []) for e in experts}
        domains = {
            e.label: e.metadata.expert if e.metadata.expert in cfg.eval_domains else None for e in experts
        }
        model, cheap, flagged = rank_claims(
            model, experts, by_label, domains, tokenizer, int(BUDGET_FRACTION * full_tokens),
            rng or random.SystemRandom(),  # nodes cannot know which batches will be checked
        )  # fmt: skip
    cheap_seconds, fallback = time.monotonic() - started, None
    if cheap is not None and not audit:
        short = [e for e in cheap.experts if e.score is None and e.expert not in flagged]
        if short:  # the cheap ranking cannot weigh these: the full evaluation does, this generation
            fallback = "; ".join(f"{e.expert}: {e.unscored}" for e in short)
            logger.info("full evaluation instead of the cheap ranking (%s)", fallback)
            audit = True
    matrix, per_block, base_blocks = None, None, None
    started = time.monotonic()
    if blocks and audit:
        model, matrix, per_block = evaluate_blocks(model, experts, blocks)
        base_blocks = per_block.base
    elif blocks:
        base_blocks, matrix = _base_only(model, blocks)
    logger.info(
        "screening of generation %d: cheap ranking %s; %s in %.1f s", generation,
        f"{cheap.cost_tokens} tokens in {cheap_seconds:.1f} s" if cheap is not None else "none (no claims)",
        f"full evaluation ({full_tokens} tokens)" if per_block is not None else "the base's evaluation only",
        time.monotonic() - started,
    )  # fmt: skip
    agree = None
    if cheap is not None and per_block is not None:
        order = [e.expert for e in cheap.experts]
        spent_cheap = cheap.cost_tokens

        def agree(full_order: list[str]) -> Agreement:
            return agreement(order, full_order, spent_cheap, full_tokens)

    return Screening(model, matrix, per_block, cheap, agree, flagged, fallback, base_blocks)
