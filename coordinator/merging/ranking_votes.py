"""Domains as voters: Borda points, Bradley–Terry strengths and their bootstrap, for the full ranking.

Each domain orders the experts by mean loss; :func:`vote` aggregates those orders by rank, never by raw
loss (Borda points; ``choix``'s ILSR fit of Bradley–Terry log-strengths with a small regularisation
``alpha``); :func:`rank_order` turns them into ranks; :func:`bootstrap_resamples` redoes all of it on
resampled blocks (the same blocks for every model) and :func:`interval` / :func:`rank_range` read
intervals off the resamples. :mod:`cogen.coordinator.merging.ranking` builds the ranking records.
"""

from __future__ import annotations

import choix
import numpy as np
from scipy.stats import rankdata

STRENGTH_DECIMALS = 6  # closer strengths tie: ILSR converges to ~1e-8; symmetric experts differ in last bits


def vote(losses: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Borda points and BT strengths of the experts (columns) from losses ``[domains, experts]``."""
    n = losses.shape[1]
    borda = sum((n - rankdata(row, method="average") for row in losses), np.zeros(n))
    if n == 1:
        return borda, np.zeros(1)
    wins = np.argwhere(losses[:, :, None] < losses[:, None, :])  # (domain, winner, loser)
    comparisons = [(int(w), int(loser)) for w, loser in wins[:, 1:]]
    return borda, np.asarray(choix.ilsr_pairwise(n, comparisons, alpha=alpha), dtype=np.float64)


def rank_order(borda: np.ndarray, strength: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """1-based rank of each expert: by strength, then Borda points, then ``tiebreak`` (ascending)."""
    order = np.lexsort((tiebreak, -borda, -np.round(strength, STRENGTH_DECIMALS)))
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def worst_if_not_finite(values: np.ndarray) -> np.ndarray:
    """A loss that is not finite counts as the worst there is."""
    return np.where(np.isfinite(values), values, np.inf)


def interval(samples: np.ndarray, level: float) -> tuple[float, float] | None:
    """The central ``level`` interval of bootstrap samples (``None``: none, or one not finite)."""
    if samples.size == 0 or not np.isfinite(samples).all():
        return None
    tail = (1 - level) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def bootstrap_resamples(
    base_blocks: dict[str, np.ndarray],
    blocks: dict[str, np.ndarray],
    rng: np.random.Generator,
    count: int,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Ranks ``[B, E]``, strengths ``[B, E]`` and per-domain improvements ``{d: [B, E]}`` of ``count``
    resamples; each resamples every domain's blocks, the same blocks for the base and all experts."""
    experts = next(iter(blocks.values())).shape[0]
    ranks = np.zeros((count, experts), dtype=np.int64)
    strength = np.zeros((count, experts))
    improvement: dict[str, np.ndarray] = {}
    loss = np.zeros((count, len(blocks), experts))
    for i, (d, per_block) in enumerate(blocks.items()):
        picks = rng.integers(0, per_block.shape[1], size=(count, per_block.shape[1]))
        loss[:, i, :] = per_block[:, picks].mean(axis=2).T
        base = base_blocks[d][picks].mean(axis=1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            improvement[d] = (base - loss[:, i, :]) / base
    for b in range(count):
        borda, strength[b] = vote(worst_if_not_finite(loss[b]), alpha)
        ranks[b] = rank_order(borda, strength[b], rng.permutation(experts))  # exact ties: a coin flip
    return ranks, strength, improvement


def rank_range(samples: np.ndarray, level: float) -> tuple[int, int]:
    """The central ``level`` interval of bootstrap ranks, widened to ranks that occurred."""
    tail = (1 - level) / 2
    low = np.quantile(samples, tail, method="lower")
    high = np.quantile(samples, 1 - tail, method="higher")
    return int(low), int(high)
