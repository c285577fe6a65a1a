"""A node's ``/healthz`` and ``/readyz`` checks (served on its metrics port, :mod:`cogen.node.metrics`).

- ``/healthz`` (alive): the process serves and its DHT answers (:func:`cogen.core.health.dht_check`).
- ``/readyz`` (doing its job): alive, and
  ``training`` — the model is loaded and the node trains, in its expert's group or alone (not while it
  is joining: loading the base, claiming a shard, joining or loading its group's state; nor stopping);
  ``base`` — it follows the latest base: it trains on the newest generation it has fetched and verified,
  or has been behind it for less than the grace of one switch (it moves at its next outer step; the
  grace is a minute plus twice the time of one outer step's inner steps, measured) and by at most one
  generation. Only verified bases count: an announcement alone (anyone can make one) never makes a
  node unready.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from cogen.core.config import NodeConfig
from cogen.core.health import Check, dht_check
from cogen.core.swarm import SwarmClient
from cogen.node.follow import BaseFollower
from cogen.node.group import GroupAverager
from cogen.node.metrics import NodeMetrics
from cogen.node.reporting import NodeReporter

SWITCH_BASE_S = 60.0  #: the fixed part of the grace of one switch (loading the new base)


class NodeFacts(Protocol):
    """What the checks read from the node (:class:`cogen.node.service.ExpertNode`)."""

    @property
    def cfg(self) -> NodeConfig: ...
    @property
    def client(self) -> SwarmClient | None: ...
    @property
    def reporter(self) -> NodeReporter | None: ...
    @property
    def group(self) -> GroupAverager | None: ...
    @property
    def follower(self) -> BaseFollower | None: ...
    @property
    def metrics(self) -> NodeMetrics | None: ...
    @property
    def generation(self) -> int: ...


class NodeHealth:
    """``live()`` / ``ready()`` of one node; ``clock`` is monotonic seconds (replaceable in tests)."""

    def __init__(self, node: NodeFacts, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.clock = clock
        self._behind_since: float | None = None

    def live(self) -> list[Check]:
        client = self.node.client
        return [dht_check(client.dht if client is not None else None)]

    def ready(self) -> list[Check]:
        return [*self.live(), self._training(), self._base()]

    def _training(self) -> Check:
        reporter = self.node.reporter
        state = reporter.state if reporter is not None else "joining"
        if state == "joining":
            return Check("training", False, "joining: loading the base, claiming a shard, joining its group")
        if state == "stopping":
            return Check("training", False, "stopping")
        group = self.node.group
        if group is not None:
            return Check("training", True, f"{state}, in its expert's group at outer step {group.outer_step}")
        if self.node.cfg.group.solo:
            return Check("training", True, f"{state}, alone (--solo)")
        return Check("training", True, f"{state}, between groups (moving to a new base)")

    def grace_s(self) -> float:
        """The grace of one switch: loading a base plus twice the time of one outer step's inner steps."""
        metrics = self.node.metrics
        step_s = metrics.mean_step_s if metrics is not None else None
        return SWITCH_BASE_S + 2 * self.node.cfg.group.inner_steps * (step_s or 1.0)

    def _base(self) -> Check:
        follower, own = self.node.follower, self.node.generation
        if not self.node.cfg.follow:
            return Check("base", True, f"generation {own}; not following newer ones (--no-follow)")
        newest = follower.generation if follower is not None else own
        if newest <= own:
            self._behind_since = None
            return Check("base", True, f"on generation {own}, the newest it knows of")
        now = self.clock()
        if self._behind_since is None:
            self._behind_since = now
        behind_s, grace = now - self._behind_since, self.grace_s()
        detail = f"on generation {own}; generation {newest} fetched, behind for {behind_s:.0f} s"
        if newest - own > 1 or behind_s > grace:
            return Check("base", False, f"{detail} (grace {grace:.0f} s): not following the latest base")
        return Check("base", True, f"{detail}; moves at its next outer step (grace {grace:.0f} s)")
