"""Which announced source of a base to try next, and when to try a failed one again.

A :class:`SourceBook` remembers each source (its URL and the manifest sha256 it announced) that failed:

- a transfer failure (refused, timed out, too slow, cut short: :class:`cogen.node.fetch.FetchError`) puts
  the source on exponential backoff (:class:`cogen.core.backoff.Backoff`), ``fetch_backoff_s`` doubling
  per failure up to ``fetch_backoff_max_s``, jittered (a random 50-100 % of it) so that nodes do not
  return in step;
- provably wrong content under its own announcement (a manifest other than announced or not signed by the
  trusted key, a file whose size or sha256 the signed manifest contradicts:
  :class:`cogen.protocols.manifest.ManifestError`) distrusts it for ``distrust_s``. Keyed by URL *and*
  sha, so a hostile peer announcing someone else's URL with a wrong sha distrusts only its own pair;
- a failure of this host (disk full) holds every source back, with the same backoff.

:meth:`SourceBook.order` sorts what may be tried now. What a source claims about itself (its generation,
its time) never lets it jump the queue: first the manifests the coordinator announces (the owners of the
SwarmInfo records that speak for the trusted key: :mod:`cogen.node.trust`), then newer generations, then
the manifest sha announced by more distinct record owners, then fewer past failures; ties are shuffled to
spread the load over donors.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cogen.core.backoff import Backoff
from cogen.core.config import FetchConfig
from cogen.protocols import CheckpointSource

_MAX_REMEMBERED = 4096  # sources remembered at most (the oldest are forgotten first)
JITTER = 0.5  #: a failed source waits a random 50-100 % of its backoff


@dataclass
class _Health:
    backoff: Backoff  # counts the failures (a distrust too) and says how long to wait
    not_before: float = 0.0  # clock time before which the source is not tried
    distrusted: bool = False
    updated: float = 0.0

    @property
    def failures(self) -> int:
        return self.backoff.failures


def _key(source: CheckpointSource) -> tuple[str, str]:
    return source.url, source.manifest_sha256


class SourceBook:
    """Backoff and distrust per (url, manifest sha), and the order to try sources in."""

    def __init__(
        self,
        cfg: FetchConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self._health: dict[tuple[str, str], _Health] = {}
        self._local = self._new()  # this host's own failures (disk full)

    def _new(self) -> _Health:
        cap = self.cfg.fetch_backoff_max_s
        return _Health(Backoff(min(self.cfg.fetch_backoff_s, cap), cap, jitter=JITTER, rng=self.rng))

    def _entry(self, source: CheckpointSource) -> _Health:
        if len(self._health) >= _MAX_REMEMBERED and _key(source) not in self._health:
            oldest = min(self._health, key=lambda k: self._health[k].updated)
            del self._health[oldest]
        health = self._health.get(_key(source))
        if health is None:
            health = self._health[_key(source)] = self._new()
        health.updated = self.clock()
        return health

    def transfer_failed(self, source: CheckpointSource) -> float:
        """Back ``source`` off after a failed transfer; returns the seconds until it may be tried again."""
        health = self._entry(source)
        delay = health.backoff.failed()
        health.not_before = self.clock() + delay
        return delay

    def distrust(self, source: CheckpointSource) -> float:
        """Skip ``source`` for ``distrust_s`` (it served content its manifest contradicts); returns that."""
        health = self._entry(source)
        health.backoff.failures += 1
        health.distrusted = True
        health.not_before = self.clock() + self.cfg.distrust_s
        return self.cfg.distrust_s

    def local_failed(self) -> float:
        """Hold every source back after this host failed (disk full); returns the seconds to wait."""
        delay = self._local.backoff.failed()
        self._local.not_before = self.clock() + delay
        return delay

    def succeeded(self, source: CheckpointSource) -> None:
        self._health.pop(_key(source), None)
        self._local = self._new()

    def usable(self, source: CheckpointSource) -> bool:
        """Whether ``source`` may be tried now (not backing off, not distrusted, this host not held)."""
        now = self.clock()
        if now < self._local.not_before:
            return False
        health = self._health.get(_key(source))
        return health is None or now >= health.not_before

    def failures(self, source: CheckpointSource) -> int:
        """How often ``source`` failed since it last succeeded."""
        health = self._health.get(_key(source))
        return health.failures if health else 0

    def is_distrusted(self, source: CheckpointSource) -> bool:
        health = self._health.get(_key(source))
        return health is not None and health.distrusted and self.clock() < health.not_before

    def order(
        self, announced: Iterable[tuple[bytes, CheckpointSource]], endorsed: set[tuple[int, str]]
    ) -> list[CheckpointSource]:
        """The usable sources of ``announced`` (record owner, record), best first (see the module).

        ``endorsed``: the (generation, manifest sha) pairs the coordinator announces.
        """
        announced = list(announced)
        votes: dict[tuple[int, str], set[bytes]] = {}
        for owner, source in announced:
            votes.setdefault((source.generation, source.manifest_sha256), set()).add(owner)
        unique = list({_key(s): s for _, s in announced}.values())
        self.rng.shuffle(unique)

        def rank(source: CheckpointSource) -> tuple[int, int, int, int]:
            pair = (source.generation, source.manifest_sha256)
            health = self._health.get(_key(source))
            return (
                pair not in endorsed,
                -source.generation,
                -len(votes[pair]),
                health.failures if health else 0,
            )

        return sorted((s for s in unique if self.usable(s)), key=rank)
