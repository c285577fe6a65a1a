"""A live view of the swarm, read from the DHT: which peers are up, on which expert, how far along.

:class:`SwarmMonitor` polls the swarm's ``nodes`` and ``progress`` records in a background thread
and keeps the last state of every peer it has seen, so a peer whose records expired is shown as
``stale`` for a while instead of vanishing. :meth:`SwarmMonitor.snapshot` is what ``/api/swarm`` serves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from cogen.protocols import PROTOCOL_VERSION, NodeInfo, TrainingProgress, software_version
from cogen.swarm import SwarmClient, owner_fingerprint

logger = logging.getLogger(__name__)


class PeerSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(description="short, stable id: sha256 of the peer's public key")
    peer_id: str
    expert: str
    state: str = Field(description="joining, training, stopping, or stale (not heard from recently)")
    online: bool
    device: str
    device_name: str
    memory_bytes: int
    precision: str
    software_version: str
    shard: int
    step: int
    samples: int
    tokens: int
    loss: float | None = Field(description="mean training loss of the last interval; null if unknown or NaN")
    loss_is_nan: bool
    samples_per_second: float
    peak_memory_bytes: int
    last_seen_s: float = Field(description="seconds since this peer's last record")


class ExpertSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    expert: str
    members: int = Field(description="online peers training this expert")
    samples_per_second: float
    tokens: int
    mean_loss: float | None


class SwarmSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    swarm: str
    protocol_version: int
    software_version: str
    coordinator_peer_id: str
    initial_peers: list[str]
    generated_at: float
    peers_online: int
    samples_per_second: float
    peers: list[PeerSummary]
    experts: list[ExpertSummary]


@dataclass
class _PeerState:
    info: NodeInfo | None = None
    progress: TrainingProgress | None = None
    last_seen: float = 0.0
    online: bool = False
    first_seen: float = field(default_factory=time.time)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class SwarmMonitor:
    """Polls the DHT every ``poll_interval_s``; ``start`` / ``stop`` / ``is_running``."""

    def __init__(
        self,
        client: SwarmClient,
        poll_interval_s: float = 2.0,
        stale_after_s: float = 90.0,
        forget_after_s: float = 3600.0,
    ):
        self.client = client
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self._peers: dict[str, _PeerState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="swarm-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a DHT hiccup must not kill the view
                logger.warning("polling the swarm failed; retrying", exc_info=True)
            self._stop.wait(self.poll_interval_s)

    def poll(self) -> None:
        """Read the swarm's records once and update the view."""
        nodes = self.client.fetch("nodes")
        progress = self.client.fetch("progress")
        now = time.time()
        with self._lock:
            for state in self._peers.values():
                state.online = False
            for entry in nodes:
                state = self._peers.setdefault(owner_fingerprint(entry.owner), _PeerState())
                assert isinstance(entry.record, NodeInfo)
                state.info, state.online = entry.record, True
                state.last_seen = max(state.last_seen, entry.record.updated_at)
            for entry in progress:
                state = self._peers.setdefault(owner_fingerprint(entry.owner), _PeerState())
                assert isinstance(entry.record, TrainingProgress)
                state.progress = entry.record
                state.last_seen = max(state.last_seen, entry.record.time)
            for fp in [
                fp
                for fp, s in self._peers.items()
                if now - max(s.last_seen, s.first_seen) > self.forget_after_s
            ]:
                del self._peers[fp]
            self.polls += 1

    def peers(self) -> list[PeerSummary]:
        now = time.time()
        out = []
        with self._lock:
            items = list(self._peers.items())
        for fp, state in items:
            info, prog = state.info, state.progress
            if info is None:
                continue  # progress without an announcement: wait for its NodeInfo
            stale = not state.online or now - state.last_seen > self.stale_after_s
            loss = prog.loss if prog else None
            out.append(
                PeerSummary(
                    id=fp,
                    peer_id=info.peer_id,
                    expert=info.expert,
                    state="stale" if stale else info.state,
                    online=not stale,
                    device=info.hardware.device,
                    device_name=info.hardware.device_name,
                    memory_bytes=info.hardware.memory_bytes,
                    precision=info.precision,
                    software_version=info.software_version,
                    shard=info.shard,
                    step=prog.step if prog else 0,
                    samples=prog.samples if prog else 0,
                    tokens=prog.tokens if prog else 0,
                    loss=_finite_or_none(loss),
                    loss_is_nan=loss is not None and math.isnan(loss),
                    samples_per_second=prog.samples_per_second if prog else 0.0,
                    peak_memory_bytes=prog.peak_memory_bytes if prog else 0,
                    last_seen_s=round(now - state.last_seen, 3),
                )
            )
        return sorted(out, key=lambda p: (p.expert, p.id))

    def snapshot(self) -> SwarmSnapshot:
        peers = self.peers()
        online = [p for p in peers if p.online]
        experts = []
        for name in sorted({p.expert for p in peers}):
            members = [p for p in online if p.expert == name]
            losses = [p.loss for p in members if p.loss is not None]
            experts.append(
                ExpertSummary(
                    expert=name,
                    members=len(members),
                    samples_per_second=sum(p.samples_per_second for p in members),
                    tokens=sum(p.tokens for p in peers if p.expert == name),
                    mean_loss=sum(losses) / len(losses) if losses else None,
                )
            )
        return SwarmSnapshot(
            swarm=self.client.cfg.swarm,
            protocol_version=PROTOCOL_VERSION,
            software_version=software_version(),
            coordinator_peer_id=self.client.peer_id,
            initial_peers=self.client.visible_maddrs(),
            generated_at=time.time(),
            peers_online=len(online),
            samples_per_second=sum(p.samples_per_second for p in online),
            peers=peers,
            experts=experts,
        )
