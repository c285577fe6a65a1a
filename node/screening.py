"""What a member believes of its groupmates' claims, and who is kept out of the group's rounds.

Every rule here is a deterministic function of what all members of a round see alike (the round's
all-gather, and the deltas or reveals checked against it), so honest members reach the same
verdicts and aggregate over the same members:

- **step**: the group's outer step is the median of the members' claimed steps, not the largest:
  one member claiming step 10**15 neither moves it nor makes the others "behind" (a member loads the
  group's state only when the median is ahead of it, and refuses a state far ahead of it); a claim
  more than ``STEP_SLACK`` steps ahead is a rejection.
- **weight**: a claim counts at most ``max_weight_ratio`` times the group's median claim, and at most
  what the fastest plausible hardware (``max_samples_per_s``) could train in the group's median time
  since the last outer step. A claim over the hardware bound is a rejection.
- **norm**: an update more than ``max_norm_ratio`` times the group's median norm is rejected.

:class:`Exclusions` counts the rejections of each peer: ``reject_limit`` of them within ``exclude_s``
exclude it for ``exclude_s`` seconds after the last (its updates are ignored, it is logged, and the
round reports name it, so the coordinator's dashboard raises an alert).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cogen.core.config import GroupConfig
from cogen.protocols.group_round import RoundClaim, RoundRejected, parse_claim

logger = logging.getLogger(__name__)
MAX_TRACKED = 1024  # peers whose rejections are remembered, at most
STEP_SLACK = 16  # outer steps a member may be ahead of the group's (members that missed a few rounds)


@dataclass
class Screened:
    """The claims of a round's members (by peer id), and those rejected with the reason."""

    claims: dict[str, RoundClaim] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        """The members not rejected, in peer-id order (the order every member aggregates in)."""
        return sorted(p for p in self.claims if p not in self.rejected)

    def reject(self, peer: str, why: str) -> None:
        self.rejected.setdefault(peer, why)


def parse_claims(gathered: Mapping[Any, Any]) -> Screened:
    """The round's claims from hivemind's all-gather (keyed by ``PeerID``); malformed ones are rejected."""
    screened = Screened()
    for peer, raw in gathered.items():
        try:
            screened.claims[str(peer)] = parse_claim(raw)
        except RoundRejected as e:
            screened.claims.pop(str(peer), None)
            screened.rejected[str(peer)] = str(e)
    return screened


def group_step(claims: Mapping[str, RoundClaim]) -> int:
    """The group's outer step: the median of the members' claims, the higher one of an even count (one
    member of 3 or more cannot move it; of 2, the one ahead is believed, as a joiner must be); 0: none."""
    return int(statistics.median_high([c.step for c in claims.values()])) if claims else 0


def reject_steps_ahead(screened: Screened) -> None:
    """Reject every claim of a step more than :data:`STEP_SLACK` ahead of the group's."""
    step = group_step({p: screened.claims[p] for p in screened.accepted})
    for peer in screened.accepted:
        if screened.claims[peer].step > step + STEP_SLACK:
            screened.reject(peer, f"claimed outer step {screened.claims[peer].step}, the group is at {step}")


def weight_caps(screened: Screened, cfg: GroupConfig) -> dict[str, float]:
    """Each accepted member's weight as counted; a claim beyond the hardware bound is rejected."""
    claims = {p: screened.claims[p] for p in screened.accepted}
    if not claims:
        return {}
    median_weight = statistics.median([c.weight for c in claims.values()])
    median_elapsed = statistics.median([c.elapsed_s for c in claims.values()])
    plausible = cfg.max_samples_per_s * max(median_elapsed, 1.0)
    caps = {}
    for peer, claim in claims.items():
        if claim.weight > plausible:
            screened.reject(peer, f"claimed {claim.weight:.3g} samples, over {plausible:.3g} plausible")
        caps[peer] = min(claim.weight, plausible, cfg.max_weight_ratio * max(median_weight, 1.0))
    return caps


def reject_outlier_norms(screened: Screened, norms: Mapping[str, float], cfg: GroupConfig) -> None:
    """Reject every member whose update norm is over ``max_norm_ratio`` times the group's median (of
    two members neither is: a member that just joined, still warming up, makes small updates)."""
    present = {p: n for p, n in norms.items() if p not in screened.rejected}
    if len(present) < 2:
        return
    median = statistics.median(present.values())
    for peer, norm in present.items():
        if norm > cfg.max_norm_ratio * median:
            screened.reject(
                peer, f"update norm {norm:.3g} over {cfg.max_norm_ratio:g}x the median {median:.3g}"
            )


class Exclusions:
    """Rejections per peer, and the peers excluded for having too many (see the module docstring)."""

    def __init__(self, limit: int, exclude_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.exclude_s, self.clock = limit, exclude_s, clock
        self._strikes: dict[str, list[float]] = {}
        self._until: dict[str, float] = {}

    def strike(self, peer: str, why: str) -> bool:
        """Count one rejection of ``peer``; returns whether it is excluded now."""
        now = self.clock()
        recent = [t for t in self._strikes.get(peer, []) if now - t < self.exclude_s] + [now]
        self._strikes[peer] = recent[-self.limit :]
        if len(self._strikes) > MAX_TRACKED:  # forget the peer rejected longest ago
            oldest = min(self._strikes, key=lambda p: self._strikes[p][-1])
            self._strikes.pop(oldest)
        if len(recent) >= self.limit:
            if not self.is_excluded(peer):
                logger.warning(
                    "excluding group member %s for %.0f s: %d rejected updates (last: %s)",
                    peer, self.exclude_s, len(recent), why,
                )  # fmt: skip
            self._until[peer] = now + self.exclude_s
            return True
        logger.warning("rejected the update of group member %s: %s", peer, why)
        return False

    def clear(self) -> None:
        """Forget every rejection and exclusion."""
        self._strikes.clear()
        self._until.clear()

    def is_excluded(self, peer: str) -> bool:
        return self._until.get(peer, float("-inf")) > self.clock()

    def excluded(self) -> list[str]:
        """The peers excluded now, sorted."""
        now = self.clock()
        self._until = {p: t for p, t in self._until.items() if t > now}
        return sorted(self._until)

    def record(self, screened: Screened) -> None:
        """Count every rejection of a round."""
        for peer, why in sorted(screened.rejected.items()):
            self.strike(peer, why)
