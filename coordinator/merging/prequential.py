"""The cheap ranking: experts ranked by their nodes' prequential claims, at no forward-pass cost.

**What it measures**: each expert's improvement *on its own domain* over the base, from losses its
nodes computed on streamed batches before stepping on them (:mod:`cogen.protocols.prequential`):

    improvement = (B − W) / B

with ``B`` the pooled mean of the base's first :data:`BASE_BATCHES` batches and ``W`` the pooled mean
of the recent half of the window (after the base batches, at least :data:`RECENT_MIN`) over every
member of the expert's group (weighted by their batch counts). Its standard error comes
from the batch variances by the delta method,
``se² = (W² / B⁴) · s_B² / n_B + (1 / B²) · s_W² / n_W``, and the interval is ``improvement ± z · se``
(``z`` the normal quantile of the level). It cannot see harm to other domains nor two experts that
learned the same thing: that is what the full evaluation (the audit) measures.

**Fair across domains**: an expert's *score* is the lower end of its interval divided by the best
improvement seen on its domain (this generation's experts, and what earlier generations achieved when
given): the fraction of the achievable it reached, sure of the noise. So a domain where every loss falls
a lot (easy, repetitive text) cannot put its experts above a hard domain's best: each domain's best
scores at most 1. The order is by score, then by the interval's lower end; experts without usable
claims, and experts whose claims failed a spot-check (``flagged``), go last.

**Merge weights** (:func:`cheap_weights`) use the point estimate, not the interval's lower end: cutting
at the lower end gives weight 0 to an expert that learned a lot but has few, noisy batches behind it,
and the merge then drops what it learned. The point's fraction of the achievable is shrunk by its
signal-to-noise ratio instead (``snr² / (1 + snr²)``, ``snr = improvement / se``, the factor of a normal
posterior mean under a prior as wide as the noise): a gain well above its noise keeps nearly its full
weight, one inside its noise weighs little, a loss weighs 0; each domain adds at most 1, as in the full
rule (:func:`cogen.coordinator.merging.weights.ranking_weights`). An estimate is :meth:`Estimate.usable`
only with a base estimate and at least :data:`RECENT_MIN` claimed batches; the screening runs the full
evaluation instead whenever an expert has none (:mod:`.screening`).

:func:`agreement` compares it with the full ranking (scipy's Kendall tau, top-1), :func:`evaluation_tokens`
counts what a full evaluation costs in forward-pass tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import norm

from cogen.coordinator.merging.ranking import kendall_tau
from cogen.protocols.prequential import LossRun, Prequential
from cogen.protocols.ranking import Agreement, PrequentialEntry, PrequentialRanking

__all__ = ["Estimate", "agreement", "cheap_weights", "estimate", "evaluation_tokens", "prequential_ranking"]

BASE_BATCHES = 2  #: the base's first batches used (later ones come from a model a few steps on: biased low)
RECENT_MIN = 4  #: at least this many of the most recent batches stand for the current model


@dataclass(frozen=True)
class Estimate:
    """One expert's pooled prequential estimate (losses in nats/token)."""

    expert: str
    domain: str
    base: float | None  # pooled mean of the base's first batches (None: no member saw the base)
    base_var_of_mean: float
    window: float
    window_var_of_mean: float
    batches: int  # claimed batch losses behind it

    def usable(self) -> bool:
        """Whether it can rank and weigh its expert: a base estimate and enough claimed batches."""
        return self.base is not None and self.base > 0 and self.batches >= RECENT_MIN

    def improvement(self, level: float) -> tuple[float, tuple[float, float]] | None:
        """(improvement, its interval at ``level``), or None without a base estimate."""
        if self.base is None or self.base <= 0:
            return None
        b, w = self.base, self.window
        value = (b - w) / b
        se = math.sqrt((w * w / b**4) * self.base_var_of_mean + self.window_var_of_mean / (b * b))
        z = float(norm.ppf(0.5 + level / 2))
        return value, (value - z * se, value + z * se)


def _pool(runs: Sequence[LossRun]) -> tuple[float, float, int]:
    """Pooled mean, variance of that mean, and count of several members' batch-loss runs."""
    count = sum(r.count for r in runs)
    mean = sum(r.mean * r.count for r in runs) / count
    # within- and between-member spread, as one sample of all batch losses
    total_sq = sum((r.count - 1) * r.variance + r.count * (r.mean - mean) ** 2 for r in runs)
    variance = total_sq / (count - 1) if count > 1 else 0.0
    return mean, variance / count, count


def recent_run(claim: Prequential) -> LossRun:
    """The recent half of a claim's window after its base batches: the current model, not the base."""
    run = claim.window
    after = claim.base.start + claim.base.count if claim.base is not None else run.start
    losses = [loss for position, loss in zip(run.positions(), run.losses, strict=True) if position >= after]
    if not losses:
        return run
    return run.tail(max(RECENT_MIN, len(losses) // 2))


def _base(claim: Prequential) -> LossRun | None:
    if claim.base is None:
        return None
    return claim.base.head(BASE_BATCHES)


def estimate(expert: str, claims: Iterable[Prequential]) -> Estimate | None:
    """Pool the latest claims of an expert's members (one :class:`Prequential` per member)."""
    claims = list(claims)
    if not claims:
        return None
    window, window_var, count = _pool([recent_run(c) for c in claims])
    bases = [b for b in map(_base, claims) if b is not None]
    base, base_var = (None, 0.0) if not bases else _pool(bases)[:2]
    return Estimate(expert, claims[0].stream.corpus, base, base_var, window, window_var, count)


def prequential_ranking(
    estimates: Mapping[str, Estimate | None],
    *,
    level: float = 0.9,
    flagged: Mapping[str, str] | None = None,
    checked: Mapping[str, int] | None = None,
    achievable: Mapping[str, float] | None = None,
    cost_tokens: int = 0,
) -> PrequentialRanking:
    """The cheap order (module docstring) of ``expert -> estimate`` (None: the expert made no claims).

    ``flagged``: experts whose claims failed a spot-check, and why; ``achievable``: the best improvement
    an earlier generation reached on a domain."""
    if not estimates:
        raise ValueError("no experts to rank")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    flagged, checked = flagged or {}, checked or {}
    found = {
        e: est.improvement(level) if est is not None and est.usable() else None
        for e, est in estimates.items()
    }
    best = dict(achievable or {})
    for name, est in estimates.items():
        value = found[name]
        if est is not None and value is not None and name not in flagged:
            best[est.domain] = max(best.get(est.domain, 0.0), value[0])
    rows = []
    for index, (name, est) in enumerate(estimates.items()):
        value = found[name]
        score = None
        if est is not None and value is not None and name not in flagged:
            reach = best.get(est.domain, 0.0)
            score = value[1][0] / reach if reach > 0 else min(value[1][0], 0.0)
        low = value[1][0] if value is not None else 0.0
        key = (score is None, -(score or 0.0), -low, index)
        rows.append((key, name, est, value, score))
    rows.sort(key=lambda row: row[0])
    entries = []
    for rank, (_, name, est, value, score) in enumerate(rows, start=1):
        interval = value[1] if value and all(map(math.isfinite, value[1])) else None
        entries.append(PrequentialEntry(
            expert=name, domain=est.domain if est is not None else "", rank=rank, score=_finite(score),
            improvement=_finite(value[0]) if value else None, improvement_interval=interval,
            base_loss=_finite(est.base) if est is not None else None,
            loss=_finite(est.window) if est is not None else None,
            batches=est.batches if est is not None else 0, checked=checked.get(name, 0),
            flagged=flagged.get(name), unscored=_unusable(est),
        ))  # fmt: skip
    return PrequentialRanking(experts=entries, level=level, cost_tokens=cost_tokens)


def cheap_weights(ranking: PrequentialRanking) -> dict[str, float]:
    """Merge weights from the cheap ranking (module docstring): the shrunk fraction of the achievable.

    Flagged or unscored experts weigh 0."""
    z = float(norm.ppf(0.5 + ranking.level / 2))
    best: dict[str, float] = {}
    for e in ranking.experts:
        if e.improvement is not None and not e.flagged:
            best[e.domain] = max(best.get(e.domain, 0.0), e.improvement)
    weights = {}
    for e in ranking.experts:
        gain, reach = e.improvement, best.get(e.domain, 0.0)
        if e.flagged or e.score is None or gain is None or gain <= 0 or reach <= 0:
            weights[e.expert] = 0.0
            continue
        interval = e.improvement_interval
        se = (interval[1] - interval[0]) / (2 * z) if interval is not None else 0.0
        shrink = 1.0 if se <= 0 else (gain / se) ** 2 / (1 + (gain / se) ** 2)
        weights[e.expert] = min(1.0, gain / reach) * shrink
    return weights


def agreement(cheap: Sequence[str], full: Sequence[str], cheap_tokens: int, full_tokens: int) -> Agreement:
    """How far the cheap order agrees with the full one: Kendall tau (scipy) and top-1."""
    tau = kendall_tau(cheap, full)
    top1 = bool(cheap) and bool(full) and cheap[0] == full[0]
    return Agreement(kendall_tau=tau, top1=top1, cheap_cost_tokens=cheap_tokens, full_cost_tokens=full_tokens)


def evaluation_tokens(models: int, domains: int, blocks: int, block_size: int) -> int:
    """Forward-pass tokens of a full evaluation: every model on every domain's validation blocks."""
    return models * domains * blocks * block_size


def _unusable(est: Estimate | None) -> str | None:
    if est is None:
        return "no prequential claims"
    if est.base is None:
        return "no claim of the base's loss (no member started from the base)"
    return None if est.usable() else f"{est.batches} claimed batches, fewer than {RECENT_MIN}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
