"""Spot-checks: the coordinator recomputes a random few of an expert's claimed row losses.

A node's prequential losses (:mod:`cogen.protocols.prequential`) are claims, each batch's with its
rows' own losses. Their batches are deterministic (:class:`cogen.core.data.TrainStream` from the
claim's :class:`StreamSpec`), so the coordinator rebuilds a few of them and runs the collected expert
on exactly the rows it affords, comparing them with the same rows' claims (not a part of a batch
against the batch's mean, whose row-to-row spread, tens of percent on SmolLM2, a liar could hide in):

- a **window** claim was the loss of a model a few steps older than the collected one, on rows it has
  since trained on, so an honest claim is at least about what the collected expert scores on them now.
  The check fails when ``claim < recomputed · (1 − tolerance)``: a node that reports lower losses than
  its model has (to rank first) is caught. Positions are drawn from the recent part of the window that
  the ranking uses (:func:`cogen.coordinator.merging.prequential.recent_run`);
- a **base** claim (the first batch of the generation, computed by the base itself) must match the
  base on the same rows within ``tolerance`` either way: a node that inflates the base's loss to look
  better is caught.

The tolerance (:data:`TOLERANCE`, 5 %) covers the node's 8-bit base against the coordinator's fp32 one:
at most 2.8 % on a row of SmolLM2-135M, measured on three domains. So a liar can shave at most about
that much off its recent losses unseen (plus what training on a batch lowers its loss on it).

Positions are picked with the caller's random generator (not known to the node in advance) and bounded
by ``max_position`` (a hostile claim cannot make the coordinator tokenize forever). Only the rows that
fit the token budget are run, and at least one row per claim even when the budget is smaller (small
evaluation settings), so no claim goes unchecked. The budget is a fraction of a full evaluation's
tokens (:data:`BUDGET_FRACTION`); the tokens spent are counted and recorded either way.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.evaluate import block_losses
from cogen.coordinator.merging.prequential import recent_run
from cogen.core.checkpoint import load_adapter
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream
from cogen.protocols.prequential import Prequential, StreamSpec

logger = logging.getLogger(__name__)

__all__ = ["BUDGET_FRACTION", "CheckResult", "check_expert", "rebuild_batch", "rebuild_batches"]

BUDGET_FRACTION = 0.02  #: spot-checks spend at most this fraction of a full evaluation's tokens
TOLERANCE = 0.05  #: relative slack of a check on the same rows (8-bit nodes vs an fp32 coordinator)
MAX_POSITION = 200_000  #: the furthest stream position the coordinator rebuilds


@dataclass(frozen=True)
class CheckResult:
    checked: int  # claims recomputed
    tokens: int  # forward-pass tokens spent
    failed: str | None  # why the claims do not hold (None: they held, or nothing could be checked)


def rebuild_batches(spec: StreamSpec, tokenizer: Any, positions: Sequence[int]) -> dict[int, torch.Tensor]:
    """The batches at stream ``positions`` of ``spec``'s stream, as the node read them (one pass)."""
    stream = TrainStream(
        get_corpus(spec.corpus), tokenizer, block_size=spec.block_size, batch_size=spec.batch_size,
        shard=spec.shard, num_shards=spec.num_shards, seed=spec.seed,
        validation_fraction=spec.validation_fraction,
    )  # fmt: skip
    wanted, found = set(positions), {}
    for position, batch in enumerate(itertools.islice(stream, max(wanted) + 1)):
        if position in wanted:
            found[position] = batch
    return found


def rebuild_batch(spec: StreamSpec, tokenizer: Any, position: int) -> torch.Tensor:
    """The batch at stream ``position`` of ``spec``'s stream, as the node read it."""
    return rebuild_batches(spec, tokenizer, [position])[position]


def _recompute(model: nn.Module, batch: torch.Tensor, rows: int) -> float:
    per_row = block_losses(model, {"check": batch[:rows]})["check"]
    return sum(per_row) / len(per_row)


def _claimed(rows: Sequence[float], count: int) -> float:
    return sum(rows[:count]) / len(rows[:count])


def check_expert(
    base: nn.Module,
    expert_path: Any,
    claims: Sequence[Prequential],
    tokenizer: Any,
    budget_tokens: int,
    rng: random.Random,
    tolerance: float = TOLERANCE,
) -> tuple[nn.Module, CheckResult]:
    """Check one window claim (and the base claim, if any) of a random member within ``budget_tokens``;
    returns the base (the adapter taken off again) and the result."""
    claims = [c for c in claims if c.window.start + c.window.count <= MAX_POSITION]
    if not claims:
        return base, CheckResult(0, 0, None)
    claim = rng.choice(claims)
    spec = claim.stream
    checks = 2 if claim.base is not None else 1
    rows = min(len(claim.window.rows[0]), budget_tokens // (checks * spec.block_size))
    if rows < 1:  # a claim is never left unchecked: one row each, over the budget, and counted
        logger.info("spot-check of one row (%d tokens) per claim, over the budget of %d tokens",
                    spec.block_size, budget_tokens)  # fmt: skip
        rows = 1
    tokens, checked, failed = 0, 0, None
    position = rng.choice(recent_run(claim).positions())
    base_position = claim.base.start if claim.base is not None else position  # the base's own batch
    batches = rebuild_batches(spec, tokenizer, [base_position, position])
    if claim.base is not None:
        base_rows = min(rows, len(claim.base.rows_at(base_position)))
        truth = _recompute(base, batches[base_position], base_rows)
        tokens, checked = tokens + base_rows * spec.block_size, checked + 1
        said = _claimed(claim.base.rows_at(base_position), base_rows)
        if abs(said - truth) > tolerance * truth:
            failed = f"claimed the base's loss at batch {base_position} was {said:.3f}, it is {truth:.3f}"
    with_adapter = load_adapter(base, expert_path)
    try:
        window_rows = min(rows, len(claim.window.rows_at(position)))
        truth = _recompute(with_adapter, batches[position], window_rows)
    finally:
        base = with_adapter.unload()
    tokens, checked = tokens + window_rows * spec.block_size, checked + 1
    said = _claimed(claim.window.rows_at(position), window_rows)
    if failed is None and said < truth * (1 - tolerance):
        failed = f"claimed a loss of {said:.3f} at batch {position}; the collected expert has {truth:.3f}"
    return base, CheckResult(checked, tokens, failed)
