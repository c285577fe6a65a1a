"""A live view of the swarm, read from the DHT: which peers are up, on which expert, how far along.

:class:`SwarmMonitor` polls the swarm's ``nodes`` and ``progress`` records in a background thread
and keeps the last state of every peer it has seen, so a peer whose records expired is shown as
``stale`` for a while instead of vanishing. After every poll it rebuilds one :class:`SwarmView`
(snapshot, expert groups with their loss curves, alerts, and their JSON) that the API serves as is,
so a request costs no more than a dictionary lookup however many peers there are. With a
:class:`~cogen.coordinator.history.History` it also persists loss points and averaging rounds, and
reloads them on start. What it keeps of a peer and how peers and groups are summarised is in
:mod:`cogen.coordinator.peers`; the groups' rounds, each counted once, in :mod:`cogen.coordinator.rounds`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

from cogen.coordinator.alerts import Alert, compute_alerts
from cogen.coordinator.history import History, LossPoint
from cogen.coordinator.peers import PeerState, build_groups, expert_summary, peer_summaries
from cogen.coordinator.rounds import RoundBook
from cogen.coordinator.schemas import (
    AlertList,
    GateStatus,
    GenerationSummary,
    GroupSummary,
    PeerSummary,
    RoundSummary,
    SwarmSnapshot,
)
from cogen.core.periodic import PeriodicService
from cogen.core.swarm import SwarmClient, owner_fingerprint
from cogen.protocols import PROTOCOL_VERSION, GroupProgress, NodeInfo, TrainingProgress, software_version
from cogen.protocols.gate import GateReport
from cogen.protocols.records import from_the_future

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmView:
    """Everything the API serves, rebuilt once per poll; ``json`` holds each endpoint's body."""

    snapshot: SwarmSnapshot
    groups: list[GroupSummary]
    alerts: list[Alert]
    generations: list[GenerationSummary]
    json: dict[str, bytes]


_PRUNE_EVERY_S = 60.0


class SwarmMonitor(PeriodicService):
    """Polls the DHT every ``poll_interval_s``; ``start`` / ``stop`` / ``is_running``."""

    def __init__(
        self,
        client: SwarmClient,
        poll_interval_s: float = 2.0,
        stale_after_s: float = 90.0,
        forget_after_s: float = 3600.0,
        history: History | None = None,
    ):
        self.client = client
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self.history = history
        self._peers: dict[str, PeerState] = {}
        self._rounds = RoundBook(history)
        self._generations: list[GenerationSummary] = []
        self._refused: GateReport | None = None
        self._lock = threading.Lock()
        super().__init__("swarm-monitor", poll_interval_s)
        self._view: SwarmView | None = None
        self._changes = 0  #: bumped by set_generations: a view built from older data is not kept
        self._last_prune = time.monotonic()
        self.polls = 0
        if history is not None:
            self._load_history(history)

    def tick(self) -> None:
        self.poll()

    def _load_history(self, history: History) -> None:
        since = time.time() - history.retention_s
        for point in history.loss_points(since=since):
            state = self._peers.setdefault(point.peer, PeerState(first_seen=point.t))
            state.expert = point.expert
            state.last_seen = max(state.last_seen, point.t)
            state.series.append((point.t, point.step, point.loss))
        self._rounds.load(history)

    def poll(self) -> None:
        """Read the swarm's records once, update the view and rebuild what the API serves."""
        now = time.time()
        # a record from the future would keep its peer "online" for ever: such records are left out
        nodes = [e for e in self.client.fetch(NodeInfo) if not from_the_future(e.record.updated_at, now)]
        progress = [e for e in self.client.fetch(TrainingProgress) if not from_the_future(e.record.time, now)]
        new_points: list[LossPoint] = []
        with self._lock:
            for state in self._peers.values():
                state.online = False
            for entry in nodes:
                state = self._peers.setdefault(owner_fingerprint(entry.owner), PeerState())
                assert isinstance(entry.record, NodeInfo)
                state.info, state.online, state.expert = entry.record, True, entry.record.expert
                state.last_seen = max(state.last_seen, entry.record.updated_at)
            for reported in progress:
                fp = owner_fingerprint(reported.owner)
                state = self._peers.setdefault(fp, PeerState())
                prog = reported.record
                assert isinstance(prog, TrainingProgress)
                state.progress, state.expert = prog, prog.expert
                state.last_seen = max(state.last_seen, prog.time)
                if not state.series or prog.time > state.series[-1][0]:
                    state.series.append((prog.time, prog.step, prog.loss))
                    new_points.append(
                        LossPoint(fp, prog.expert, prog.time, prog.step, prog.loss, prog.samples_per_second)
                    )
            for fp in [
                fp
                for fp, s in self._peers.items()
                if now - max(s.last_seen, s.first_seen) > self.forget_after_s
            ]:
                del self._peers[fp]
            self.polls += 1
        self._read_group_records()
        if self.history is not None:
            self.history.add_points(new_points)
            if time.monotonic() - self._last_prune > _PRUNE_EVERY_S:
                self.history.prune()
                self._last_prune = time.monotonic()
        self._keep(self._build_view, self._changes)

    def _read_group_records(self) -> None:
        """Averaging rounds from the nodes' ``groups`` records, where this protocol version has them
        (each round once: see :mod:`cogen.coordinator.rounds`)."""
        now = time.time()
        groups = [
            e
            for e in self.client.fetch(GroupProgress)
            if e.record.last_round is None or not from_the_future(e.record.last_round.time, now)
        ]
        for expert, summary in self._rounds.unseen(groups):
            self.record_round(expert, summary)

    def metrics_urls(self) -> dict[str, tuple[str, str]]:
        """Fingerprint -> (peer id, ``/metrics`` URL) of each online node that announces one (nodes run
        with ``--metrics-port``); where several owners claim one peer id, none of them (a record's peer id
        is its owner's word, and the scraper trusts a URL only at its peer id's address)."""
        with self._lock:
            infos = [(fp, s.info) for fp, s in self._peers.items() if s.online and s.info is not None]
        claims: dict[str, int] = {}
        for _, info in infos:
            claims[info.peer_id] = claims.get(info.peer_id, 0) + 1
        return {
            fp: (info.peer_id, info.metrics_url)
            for fp, info in infos
            if info.metrics_url and claims[info.peer_id] == 1
        }

    def record_round(self, expert: str, summary: RoundSummary) -> None:
        """Note an averaging round of ``expert``'s group (kept in memory and in the history file)."""
        with self._lock:
            self._rounds.add(expert, summary, persist=True)

    def set_generations(self, generations: list[GenerationSummary]) -> None:
        """Replace the list of published generations (oldest first); the API serves it from now on."""
        with self._lock:
            self._generations = list(generations)
            self._changes += 1
            self._view = None  # rebuilt by the next view(), not only after the next poll

    def set_refusal(self, report: GateReport | None) -> None:
        """The publishing gate's newest refusal (the parent stayed the base), or None once published."""
        with self._lock:
            self._refused = report
            self._changes += 1
            self._view = None

    def peers(self) -> list[PeerSummary]:
        now = time.time()
        with self._lock:
            items = list(self._peers.items())
        return peer_summaries(items, now, self.stale_after_s)

    def view(self) -> SwarmView:
        """What the API serves: the view built after the last poll (built now if there was none)."""
        view = self._view
        if view is None:
            view = self._keep(self._build_view, self._changes)
        return view

    def _keep(self, build: Callable[[], SwarmView], changes: int) -> SwarmView:
        """Build a view and keep it, unless the generations changed meanwhile (a poll that started
        before a publish or a restart's read-back must not put the old list back until its next poll)."""
        view = build()
        with self._lock:
            if self._changes == changes:
                self._view = view
        return view

    def snapshot(self) -> SwarmSnapshot:
        return self.view().snapshot

    def _build_view(self) -> SwarmView:
        peers = self.peers()
        with self._lock:
            series = {
                fp: (s.expert, list(s.series)) for fp, s in self._peers.items() if s.series and s.expert
            }
            rounds, totals = self._rounds.copy()
            generations = list(self._generations)
            refused = self._refused
        groups = build_groups(peers, series, rounds, totals)
        losses: dict[str, dict[str, list[float]]] = {}
        for fp, (expert, points) in series.items():
            losses.setdefault(expert, {})[fp] = [loss for _, _, loss in points]
        alerts = compute_alerts(
            peers,
            losses,
            {g.expert: g.last_round for g in groups},
            software_version(),
            PROTOCOL_VERSION,
            flagged=generations[-1].flagged if generations else None,
            refused=refused,
        )
        online = [p for p in peers if p.online]
        last = generations[-1] if generations else None
        snapshot = SwarmSnapshot(
            swarm=self.client.cfg.swarm,
            protocol_version=PROTOCOL_VERSION,
            software_version=software_version(),
            coordinator_peer_id=self.client.peer_id,
            initial_peers=self.client.visible_maddrs(),
            generated_at=time.time(),
            peers_online=len(online),
            samples_per_second=sum(p.samples_per_second for p in online),
            generation=last.generation if last else None,
            last_merge_at=last.created_at if last else None,
            alert_count=len(alerts),
            peers=peers,
            experts=[expert_summary(g) for g in groups],
        )
        return SwarmView(
            snapshot=snapshot,
            groups=groups,
            alerts=alerts,
            generations=generations,
            json={
                "swarm": snapshot.model_dump_json().encode(),
                "peers": _dump_list(PeerSummary, peers),
                "groups": _dump_list(GroupSummary, groups),
                "alerts": AlertList(generated_at=snapshot.generated_at, alerts=alerts)
                .model_dump_json()
                .encode(),
                "generations": _dump_list(GenerationSummary, generations),
                "gate": GateStatus(published=last.gate if last else None, refused=refused)
                .model_dump_json()
                .encode(),
            },
        )


_LIST_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


def _dump_list(model: type[BaseModel], items: list[Any]) -> bytes:
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        adapter = _LIST_ADAPTERS[model] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return adapter.dump_json(items)
