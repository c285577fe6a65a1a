"""Ranking experts: robustly from the full evaluation, and cheaply from what the swarm already knows.

**Full ranking** (:func:`rank_experts`). Input: the base's and every expert's loss on each validation
block of each domain (:class:`~cogen.coordinator.merging.evaluate.BlockLosses`). On each domain the
experts are ordered by mean loss; each domain is then one *voter*, and the overall order aggregates
the votes by rank, never by raw loss, so one odd domain (an expert 1000× worse on it, a noisy
validation set) moves an expert by at most one vote instead of dominating a mean:

- Borda points: on each domain, the best of n experts gets n−1 points, the worst 0 (ties share);
- Bradley–Terry strengths: every pair of experts ordered on a domain is one comparison; ``choix``'s
  ILSR fits log-strengths (mean 0) with a small regularisation ``alpha`` (a pseudo-rate of
  comparisons, so that an expert that wins every comparison still has a finite strength);
- the overall order: by strength, then Borda points. With complete per-domain orders every pair is
  compared equally often and the two agree (the BT estimate is monotone in the number of wins);
- bootstrap: ``B`` times, resample the blocks within each domain (the same blocks for every model:
  block difficulty is shared) with a seeded numpy Generator and redo all of the above; report how
  often each expert holds its rank, and intervals of its rank, strength and per-domain improvement.

The votes, the ranks and the resamples are :mod:`cogen.coordinator.merging.ranking_votes`; this module
checks the losses and builds the :class:`~cogen.protocols.ranking.Ranking` records.

**Cheap ranking** (:func:`cheap_ranking`), no forward pass: the score is the relative drop of the
training loss its nodes reported, ``(first − last) / first``. Delta statistics streamed from the
checkpoints (:func:`delta_statistics`: norm; agreement with the elected TIES sign) break ties and
filter degenerate experts (NaN, zero delta), which go last. It measures *how much an expert learned on
its own data*, which is most of what the overall ranking reflects, but it has no cross-domain
information: it cannot see that an expert hurts the other domains, that two experts learned the same
thing, or that a loss drop comes from easy data. :func:`kendall_tau` says how far to trust it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import kendalltau
from tqdm import tqdm

from cogen.coordinator.merging.experts import Expert, iter_deltas
from cogen.coordinator.merging.ranking_votes import (
    bootstrap_resamples,
    interval,
    rank_order,
    rank_range,
    vote,
    worst_if_not_finite,
)
from cogen.protocols.ranking import (
    CheapEntry,
    CheapRanking,
    DomainEntry,
    DomainRanking,
    Ranking,
    Standing,
)

logger = logging.getLogger(__name__)

BlockValues = Sequence[float] | npt.NDArray[np.float64]  #: one model's loss on each block of a domain


def _improvement(base: float, loss: float) -> float | None:
    value = (base - loss) / base if base > 0 else math.nan
    return value if math.isfinite(value) else None


def _check(base: Mapping[str, BlockValues], experts: Mapping[str, Mapping[str, BlockValues]]) -> None:
    if not experts:
        raise ValueError("no experts to rank")
    if not base:
        raise ValueError("no domains to rank the experts on")
    for domain, blocks in base.items():
        if len(blocks) == 0:
            raise ValueError(f"domain {domain!r} has no validation blocks")
        for name, per_domain in experts.items():
            if domain not in per_domain:
                raise ValueError(f"expert {name!r} has no losses on domain {domain!r}")
            if len(per_domain[domain]) != len(blocks):
                raise ValueError(
                    f"domain {domain!r}: the base has {len(blocks)} block losses, "
                    f"expert {name!r} {len(per_domain[domain])}"
                )


def rank_experts(
    base: Mapping[str, BlockValues],
    experts: Mapping[str, Mapping[str, BlockValues]],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
    alpha: float = 0.1,
) -> Ranking:
    """The full ranking (module docstring) from per-block losses: ``base[domain]``, ``experts[e][domain]``."""
    _check(base, experts)
    if bootstrap < 0 or not 0 < level < 1 or alpha <= 0:
        raise ValueError(f"need bootstrap >= 0, 0 < level < 1, alpha > 0; got {bootstrap}, {level}, {alpha}")
    names, domains = list(experts), list(base)
    base_blocks = {d: np.asarray(base[d], dtype=np.float64) for d in domains}
    blocks = {d: np.asarray([experts[e][d] for e in names], dtype=np.float64) for d in domains}  # [E, n]
    base_loss = {d: float(base_blocks[d].mean()) for d in domains}
    loss = np.stack([blocks[d].mean(axis=1) for d in domains])  # [D, E]
    borda, strength = vote(worst_if_not_finite(loss), alpha)
    ranks = rank_order(borda, strength, np.arange(len(names)))

    boot_ranks, boot_strength, boot_improvement = bootstrap_resamples(
        base_blocks, blocks, np.random.default_rng(seed), bootstrap, alpha
    )
    if bootstrap:
        logger.info(
            "ranked %d experts on %d domains, %d bootstrap resamples", len(names), len(domains), bootstrap
        )

    per_domain = {}
    for i, d in enumerate(domains):
        order = sorted(range(len(names)), key=lambda e: (not math.isfinite(loss[i, e]), loss[i, e], e))
        entries = [
            DomainEntry(
                expert=names[e],
                loss=float(loss[i, e]) if math.isfinite(loss[i, e]) else None,
                improvement=_improvement(base_loss[d], float(loss[i, e])),
                improvement_interval=interval(boot_improvement[d][:, e], level) if bootstrap else None,
            )
            for e in order
        ]
        finite_base = base_loss[d] if math.isfinite(base_loss[d]) else None
        per_domain[d] = DomainRanking(base_loss=finite_base, blocks=len(base_blocks[d]), experts=entries)

    overall = [
        Standing(
            expert=names[e],
            rank=int(ranks[e]),
            borda=float(borda[e]),
            strength=float(strength[e]),
            rank_confidence=float(np.mean(boot_ranks[:, e] == ranks[e])) if bootstrap else None,
            rank_interval=rank_range(boot_ranks[:, e], level) if bootstrap else None,
            strength_interval=interval(boot_strength[:, e], level) if bootstrap else None,
        )
        for e in np.argsort(ranks)
    ]
    return Ranking(
        domains=domains, per_domain=per_domain, overall=overall, bootstrap=bootstrap, level=level,
        seed=seed, alpha=alpha,
    )  # fmt: skip


@dataclass(frozen=True)
class DeltaStats:
    """Weight-space statistics of one expert's dense delta over all adapted modules."""

    norm: float  #: Frobenius norm of ΔW over all modules (NaN if any coordinate is not finite)
    sign_agreement: float  #: fraction of its nonzero coordinates whose sign is the elected one (NaN: none)
    nonfinite: int  #: number of NaN/Inf coordinates


def delta_statistics(experts: list[Expert]) -> dict[str, DeltaStats]:
    """:class:`DeltaStats` of every expert, streaming ``iter_deltas`` (one module's deltas in memory).

    The elected sign of a coordinate is the sign of the sum of the experts' deltas (TIES's election,
    before trimming); an expert that mostly disagrees with it pulls against the others.
    """
    count = len(experts)
    squares, agree, counted = np.zeros(count), np.zeros(count), np.zeros(count)
    nonfinite = np.zeros(count, dtype=np.int64)
    modules = len(experts[0].modules) if experts else 0
    for _, deltas in tqdm(iter_deltas(experts), total=modules, desc="delta statistics", disable=None):
        stacked = torch.stack(deltas).flatten(1)  # [E, coordinates]
        finite = torch.isfinite(stacked)
        clean = torch.where(finite, stacked, torch.zeros_like(stacked))
        nonfinite += (~finite).sum(dim=1).numpy()
        squares += clean.double().square().sum(dim=1).numpy()
        elected, signs = clean.sum(dim=0).sign(), clean.sign()
        voting = (signs != 0) & (elected != 0)
        agree += ((signs == elected) & voting).sum(dim=1).numpy()
        counted += voting.sum(dim=1).numpy()
    return {
        e.label: DeltaStats(
            norm=math.sqrt(float(squares[i])) if nonfinite[i] == 0 else math.nan,
            sign_agreement=float(agree[i] / counted[i]) if counted[i] else math.nan,
            nonfinite=int(nonfinite[i]),
        )
        for i, e in enumerate(experts)
    }


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _degenerate(losses: tuple[float, float] | None, stats: DeltaStats | None) -> str | None:
    if losses is None:
        return "no training loss reported"
    first, last = losses
    if not (math.isfinite(first) and math.isfinite(last)):
        return "its training loss is not finite"
    if first <= 0:
        return "its first training loss is not positive"
    if stats is not None and stats.nonfinite:
        return f"its delta holds {stats.nonfinite} non-finite values"
    if stats is not None and stats.norm == 0:
        return "its delta is zero"
    return None


def cheap_ranking(
    training: Mapping[str, tuple[float, float] | None], deltas: Mapping[str, DeltaStats] | None = None
) -> CheapRanking:
    """The cheap order (module docstring) from ``expert -> (first, last) training loss`` and delta stats."""
    deltas = deltas or {}
    names = [*training, *(e for e in deltas if e not in training)]
    if not names:
        raise ValueError("no experts to rank")
    rows = []
    for index, name in enumerate(names):
        losses, stats = training.get(name), deltas.get(name)
        reason = _degenerate(losses, stats)
        score = None if reason or losses is None else (losses[0] - losses[1]) / losses[0]
        agreement = stats.sign_agreement if stats is not None and math.isfinite(stats.sign_agreement) else 0.0
        key = (True, 0.0, 0.0, index) if reason else (False, -(score or 0.0), -agreement, index)
        rows.append((key, name, losses, stats, score, reason))
    rows.sort(key=lambda row: row[0])
    entries = [
        CheapEntry(
            expert=name,
            rank=rank,
            score=score,
            first_loss=_finite_or_none(losses[0]) if losses else None,
            last_loss=_finite_or_none(losses[1]) if losses else None,
            delta_norm=_finite_or_none(stats.norm) if stats else None,
            sign_agreement=_finite_or_none(stats.sign_agreement) if stats else None,
            degenerate=reason,
        )
        for rank, (_, name, losses, stats, score, reason) in enumerate(rows, start=1)
    ]
    return CheapRanking(experts=entries)


def kendall_tau(cheap: Sequence[str], full: Sequence[str]) -> float | None:
    """Kendall tau between two orders over the experts in both (``None``: fewer than 2 in common)."""
    for order in (cheap, full):
        if len(set(order)) != len(order):
            raise ValueError(f"an order names an expert twice: {list(order)}")
    common = [e for e in full if e in set(cheap)]
    if len(common) < 2:
        return None
    position = {e: i for i, e in enumerate(cheap)}
    return float(kendalltau([position[e] for e in common], range(len(common))).statistic)


def attach_cheap(ranking: Ranking, cheap: CheapRanking) -> Ranking:
    """``ranking`` with ``cheap`` attached and its Kendall tau against the full order filled in."""
    tau = kendall_tau([c.expert for c in cheap.experts], ranking.order)
    return ranking.model_copy(update={"cheap": cheap.model_copy(update={"kendall_tau": tau})})
