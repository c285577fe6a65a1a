"""The coordinator's ``/healthz`` and ``/readyz`` checks (served by its API, :mod:`cogen.coordinator.api`).

- ``/healthz`` (alive): the API serves, the swarm monitor polls, the DHT answers
  (:func:`cogen.core.health.dht_check`).
- ``/readyz`` (doing its job): alive, and its state is rebuilt — the monitor has read the swarm at
  least once, a merging coordinator has read its published generations back from its out dir, and a
  coordinator (not an observer) announces the swarm.
"""

from __future__ import annotations

from typing import Protocol

from cogen.coordinator.config import CoordinatorConfig
from cogen.coordinator.generations import GenerationLoop
from cogen.coordinator.view import SwarmMonitor
from cogen.core.health import Check, dht_check
from cogen.core.periodic import PeriodicService
from cogen.core.swarm import SwarmClient


class ApiFacts(Protocol):
    def is_running(self) -> bool: ...


class CoordinatorFacts(Protocol):
    """What the checks read from the coordinator (:class:`cogen.coordinator.service.Coordinator`)."""

    @property
    def cfg(self) -> CoordinatorConfig: ...
    @property
    def client(self) -> SwarmClient | None: ...
    @property
    def monitor(self) -> SwarmMonitor | None: ...
    @property
    def generations(self) -> GenerationLoop | None: ...
    @property
    def announcer(self) -> PeriodicService | None: ...

    def merges(self) -> bool: ...


class CoordinatorHealth:
    def __init__(self, coordinator: CoordinatorFacts):
        self.coordinator = coordinator

    def live(self) -> list[Check]:
        c = self.coordinator
        monitor = c.monitor
        polling = monitor is not None and monitor.is_running()
        return [
            Check("api", True, "serving"),  # whoever reads this got an answer from it
            Check("monitor", polling, "polling the swarm's records" if polling else "not polling"),
            dht_check(c.client.dht if c.client is not None else None),
        ]

    def ready(self) -> list[Check]:
        c = self.coordinator
        polls = c.monitor.polls if c.monitor is not None else 0
        checks = [
            *self.live(),
            Check("view", polls > 0, f"{polls} polls of the swarm" if polls else "the swarm not read yet"),
        ]
        if c.merges():
            loop = c.generations
            checks.append(
                Check("generations", True, f"{len(loop.published)} published generations read back; "
                      f"generation {loop.generation} is the current base")
                if loop is not None
                else Check("generations", False, "reading back its published generations")
            )  # fmt: skip
        if not c.cfg.view.observer:
            announcing = c.announcer is not None and c.announcer.is_running()
            checks.append(
                Check("announcing", announcing, "announcing the swarm" if announcing else "not yet")
            )
        return checks
