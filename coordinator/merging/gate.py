"""The publishing gate's rule: is a candidate base worse than its parent beyond the bootstrap noise?

Input: the parent's and the candidate's loss on each validation block of each domain (the same blocks
for both, as :func:`cogen.coordinator.merging.evaluate.block_losses` gives them). On each domain the
change is the mean of the paired per-block differences ``candidate - parent``; a seeded bootstrap
resamples the blocks (paired: block difficulty is shared) and gives an interval of that mean. The
candidate is *worse* on a domain when the whole interval lies above zero, i.e. its loss is higher
than the parent's by more than the resampling noise explains, or when its loss is not finite. It
passes the gate only when it is worse on no domain (:attr:`GateDecision.passed`); the per-domain
evidence says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cogen.coordinator.merging.ranking_votes import interval


@dataclass(frozen=True)
class DomainVerdict:
    """The evidence on one domain."""

    domain: str
    parent_loss: float
    candidate_loss: float
    change: float  #: candidate - parent, mean over blocks (negative: the candidate is better)
    interval: tuple[float, float]  #: the bootstrap interval of ``change`` at the decision's level
    worse: bool


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on every domain; ``passed`` when the candidate is worse on none."""

    domains: list[DomainVerdict]
    bootstrap: int
    level: float
    seed: int

    @property
    def passed(self) -> bool:
        return not any(v.worse for v in self.domains)

    @property
    def worse(self) -> list[str]:
        return [v.domain for v in self.domains if v.worse]

    def reason(self) -> str:
        """One line: why the candidate passes or not."""
        if self.passed:
            return f"not worse than its parent on any of {len(self.domains)} domains"
        parts = [
            f"{v.domain} {v.parent_loss:.4f} -> {v.candidate_loss:.4f} "
            f"(change interval [{v.interval[0]:+.4f}, {v.interval[1]:+.4f}])"
            for v in self.domains
            if v.worse
        ]
        return "worse than its parent beyond the bootstrap noise on " + "; ".join(parts)


def judge(
    parent: Mapping[str, Sequence[float]],
    candidate: Mapping[str, Sequence[float]],
    *,
    bootstrap: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> GateDecision:
    """The gate's decision (module docstring) from ``parent[domain]``, ``candidate[domain]`` losses."""
    if not parent:
        raise ValueError("the gate needs at least one domain")
    if bootstrap < 1 or not 0 < level < 1:
        raise ValueError(f"need bootstrap >= 1 and 0 < level < 1; got {bootstrap}, {level}")
    rng = np.random.default_rng(seed)
    verdicts = []
    for domain, before in parent.items():
        if domain not in candidate:
            raise ValueError(f"the candidate has no losses on domain {domain!r}")
        a = np.asarray(before, dtype=np.float64)
        b = np.asarray(candidate[domain], dtype=np.float64)
        if a.ndim != 1 or a.size == 0 or a.shape != b.shape:
            raise ValueError(
                f"domain {domain!r}: need equal, non-empty block losses; got {a.size} and {b.size}"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"domain {domain!r}: the parent's losses are not finite")
        diff = b - a
        change = float(diff.mean())
        if not np.isfinite(diff).all():
            verdicts.append(
                DomainVerdict(domain, float(a.mean()), math.inf, math.inf, (math.inf, math.inf), True)
            )
            continue
        means = diff[rng.integers(0, diff.size, size=(bootstrap, diff.size))].mean(axis=1)
        low, high = interval(means, level) or (math.inf, math.inf)  # finite differences: always an interval
        verdicts.append(DomainVerdict(domain, float(a.mean()), float(b.mean()), change, (low, high), low > 0))
    return GateDecision(domains=verdicts, bootstrap=bootstrap, level=level, seed=seed)
