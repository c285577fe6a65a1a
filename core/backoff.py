"""How long to wait before retrying failed work: exponential, capped, jittered.

:class:`Backoff` is the one schedule cogen retries by: the coordinator's failed collections and merges
(:mod:`cogen.coordinator.generations`, no jitter: there is one coordinator) and a node's failed
downloads per source (:mod:`cogen.node.sources`, jittered, so that nodes that failed together do not
return together).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays between retries of failing work: ``base_s``, doubling after each failure, at most ``cap_s``,
    then scaled by a random factor in ``[1 - jitter, 1]`` (drawn once per failure from ``rng``).

    ``failed()`` counts a failure and returns how long to wait before the next attempt; ``delay()`` is
    that wait again (0 before the first failure); ``succeeded()`` starts the schedule over."""

    base_s: float
    cap_s: float
    jitter: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: int = 0
    _delay: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got {self.base_s} and {self.cap_s}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def delay(self) -> float:
        """The wait after the failures counted so far (0 before the first)."""
        return self._delay if self.failures else 0.0

    def failed(self) -> float:
        self.failures += 1
        full = min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 60))
        self._delay = full * self.rng.uniform(1.0 - self.jitter, 1.0) if self.jitter else full
        return self._delay

    def succeeded(self) -> None:
        self.failures = 0
        self._delay = 0.0
