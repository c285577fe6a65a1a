"""What a node tells the swarm and its operator: its records, renewed in the background, and summaries.

:class:`NodeReporter` owns the node's signed records. ``NodeInfo`` (what it is and does), its
``ShardClaim`` and its latest ``GroupProgress`` are renewed every third of the record TTL by a
background thread — not by the training loop, so that a long averaging round, a slow step or a base
switch never lets them expire (a groupmate would then think the node gone and train alone, the
coordinator would leave its expert out, and a newcomer could take its shard). Each renewal first pings
the initial peers, so that a node cut off for a while finds the swarm again once its link is back.
``set_state`` publishes a change at once. :meth:`observe` collects inner steps; :meth:`report` logs
one summary line and publishes ``TrainingProgress`` for the steps since the last one.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hivemind.utils import get_dht_time

from cogen.core.periodic import PeriodicService
from cogen.core.swarm import SwarmClient
from cogen.core.telemetry import current_memory_bytes, format_bytes, gpu_memory_bytes
from cogen.node.metrics import NodeMetrics
from cogen.node.shards import renew_claim
from cogen.protocols import GroupProgress, NodeInfo, TrainingProgress
from cogen.protocols.prequential import Prequential

logger = logging.getLogger(__name__)


@dataclass
class LossWindow:
    """Inner steps since the last summary, and the first and last windowed losses of this base."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None

    def add(self, loss: float, samples: int, seconds: float) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.seconds += seconds

    def close(self) -> tuple[float, float]:
        """The window's mean loss and samples/s; starts a new window."""
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        self.losses, self.samples, self.seconds = [], 0, 0.0
        if math.isfinite(loss):
            self.last_loss = loss
            if self.first_loss is None:
                self.first_loss = loss
        return loss, rate


class NodeReporter(PeriodicService):
    """Publishes and renews a node's records; ``start`` / ``stop`` / ``is_running``."""

    def __init__(
        self,
        client: SwarmClient,
        expert: str,
        node_info: Callable[[str], NodeInfo],
        ttl_s: float,
        window: LossWindow,
        metrics: NodeMetrics | None = None,
    ):
        super().__init__("node-records", interval_s=ttl_s / 3, run_first=False)
        self.client = client
        self.expert = expert
        self.node_info = node_info  # builds the node's record for a state
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.state = "joining"
        self.claim: tuple[int, int] | None = None  # (shard, num_shards) once claimed
        self.window = window
        self._group: GroupProgress | None = None
        self._lock = threading.Lock()

    def set_state(self, state: str) -> None:
        """Publish ``state`` now (and keep renewing it)."""
        self.state = state
        self._publish()
        if self.metrics is not None:
            self.metrics.set_state(state)

    def publish_group(self, progress: GroupProgress) -> None:
        self._group = progress
        self.client.publish(progress)

    def tick(self) -> None:
        # after a partition hivemind forgets the peers it lost: ping the initial ones back into view
        self.client.reconnect(self.client.cfg.initial_peers)
        self._publish()
        group = self._group
        if group is not None:
            self.client.publish(group)

    def _publish(self) -> None:
        with self._lock:  # the training thread and the renewal thread may both publish
            self.client.publish(self.node_info(self.state))
            if self.claim is not None:
                renew_claim(self.client, self.expert, self.claim[0], self.claim[1], self.ttl_s)

    def observe(self, loss: float, samples: int, tokens: int, seconds: float) -> None:
        self.window.add(loss, samples, seconds)
        if self.metrics is not None:
            self.metrics.observe_step(loss, samples, tokens, seconds)

    def report(
        self,
        step: int,
        samples: int,
        tokens: int,
        skipped: int,
        peak: int,
        prequential: Prequential | None = None,
    ) -> None:
        """Log one summary line and publish TrainingProgress for the steps since the last report (with the
        trainer's prequential losses, :mod:`cogen.protocols.prequential`)."""
        loss, rate = self.window.close()
        self.client.publish(TrainingProgress(
            peer_id=self.client.peer_id, expert=self.expert, step=step, samples=samples, tokens=tokens,
            loss=loss, samples_per_second=rate, peak_memory_bytes=peak, rss_bytes=current_memory_bytes(),
            gpu_memory_bytes=gpu_memory_bytes(), time=get_dht_time(), prequential=prequential,
        ))  # fmt: skip
        logger.info(
            "%s | step %d | loss %.4f | %.2f samples/s | %d tokens | peak mem %s | skipped %d",
            self.expert, step, loss, rate, tokens, format_bytes(peak), skipped,
        )  # fmt: skip
