"""A live view of the swarm, read from the DHT: which peers are up, on which expert, how far along.

:class:`SwarmMonitor` polls the swarm's ``nodes`` and ``progress`` records in a background thread
and keeps the last state of every peer it has seen, so a peer whose records expired is shown as
``stale`` for a while instead of vanishing. After every poll it rebuilds one :class:`SwarmView`
(snapshot, expert groups with their loss curves, alerts, and their JSON) that the API serves as is,
so a request costs no more than a dictionary lookup however many peers there are. With a
:class:`~cogen.coordinator.history.History` it also persists loss points and averaging rounds, and
reloads them on start.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter

from cogen.coordinator.alerts import Alert, compute_alerts
from cogen.coordinator.history import History, LossPoint, RoundRow
from cogen.coordinator.schemas import (
    AlertList,
    ExpertSummary,
    GenerationSummary,
    GroupSummary,
    LossSeries,
    PeerSummary,
    RoundSummary,
    SwarmSnapshot,
)
from cogen.core.periodic import PeriodicService
from cogen.core.swarm import SwarmClient, owner_fingerprint
from cogen.protocols import PROTOCOL_VERSION, RECORD_SCHEMAS, NodeInfo, TrainingProgress, software_version

logger = logging.getLogger(__name__)


@dataclass
class _PeerState:
    info: NodeInfo | None = None
    progress: TrainingProgress | None = None
    last_seen: float = 0.0
    online: bool = False
    first_seen: float = field(default_factory=time.time)
    expert: str = ""
    series: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))


@dataclass(frozen=True)
class SwarmView:
    """Everything the API serves, rebuilt once per poll; ``json`` holds each endpoint's body."""

    snapshot: SwarmSnapshot
    groups: list[GroupSummary]
    alerts: list[Alert]
    generations: list[GenerationSummary]
    json: dict[str, bytes]


#: loss points per peer kept in memory for charts and alerts (the history file may keep more)
SERIES_POINTS = 300
_PRUNE_EVERY_S = 60.0


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


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
        self._peers: dict[str, _PeerState] = {}
        self._rounds: dict[str, deque[RoundSummary]] = {}
        self._round_totals: dict[str, list[int]] = {}  # expert -> [ok, failed, bytes]
        self._generations: list[GenerationSummary] = []
        self._seen_rounds: set[tuple[str, int, int, bool]] = set()  # (expert, generation, outer step, ok)
        self._lock = threading.Lock()
        super().__init__("swarm-monitor", poll_interval_s)
        self._view: SwarmView | None = None
        self._last_prune = time.monotonic()
        self.polls = 0
        if history is not None:
            self._load_history(history)

    def tick(self) -> None:
        self.poll()

    def _load_history(self, history: History) -> None:
        since = time.time() - history.retention_s
        for point in history.loss_points(since=since):
            state = self._peers.setdefault(point.peer, _PeerState(first_seen=point.t))
            state.expert = point.expert
            state.last_seen = max(state.last_seen, point.t)
            state.series.append((point.t, point.step, point.loss))
        for row in reversed(history.rounds(limit=1000)):
            self._seen_rounds.add((row.expert, row.generation, row.outer_step, row.ok))
            fields = {k: v for k, v in row.__dict__.items() if k != "expert"}
            self._add_round(row.expert, RoundSummary(**fields), persist=False)

    def poll(self) -> None:
        """Read the swarm's records once, update the view and rebuild what the API serves."""
        nodes = self.client.fetch("nodes")
        progress = self.client.fetch("progress")
        now = time.time()
        new_points: list[LossPoint] = []
        with self._lock:
            for state in self._peers.values():
                state.online = False
            for entry in nodes:
                state = self._peers.setdefault(owner_fingerprint(entry.owner), _PeerState())
                assert isinstance(entry.record, NodeInfo)
                state.info, state.online, state.expert = entry.record, True, entry.record.expert
                state.last_seen = max(state.last_seen, entry.record.updated_at)
            for entry in progress:
                fp = owner_fingerprint(entry.owner)
                state = self._peers.setdefault(fp, _PeerState())
                prog = entry.record
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
        self._view = self._build_view()

    def _read_group_records(self) -> None:
        """Averaging rounds from the nodes' ``groups`` records, where this protocol version has them.

        Read defensively (by attribute) so the view works with and without group averaging; a round is
        recorded once per (expert, generation, outer step, result), as its first reporting member saw it
        (a group's outer steps start again at each generation).
        """
        if "groups" not in RECORD_SCHEMAS:
            return
        for entry in self.client.fetch("groups"):
            rec, last = entry.record, getattr(entry.record, "last_round", None)
            expert = getattr(rec, "expert", None)
            if last is None or not isinstance(expert, str):
                continue
            generation = getattr(rec, "generation", 0)
            key = (
                expert,
                generation if isinstance(generation, int) else 0,
                int(last.outer_step),
                bool(last.ok),
            )
            if key in self._seen_rounds:
                continue
            self._seen_rounds.add(key)
            summary = RoundSummary(
                outer_step=key[2],
                generation=key[1],
                finished_at=float(last.time),
                group_size=int(last.group_size),
                duration_s=float(last.duration_s),
                bytes_sent=int(last.bytes_sent),
                ok=key[3],
                error=str(getattr(last, "reason", "")) or None,
            )
            self.record_round(expert, summary)

    def metrics_urls(self) -> dict[str, str]:
        """Peer id -> the ``/metrics`` URL an online node announces (nodes run with ``--metrics-port``)."""
        with self._lock:
            infos = {fp: s.info for fp, s in self._peers.items() if s.online and s.info is not None}
        urls = {fp: getattr(info, "metrics_url", None) for fp, info in infos.items()}
        return {fp: url for fp, url in urls.items() if isinstance(url, str) and url}

    def record_round(self, expert: str, summary: RoundSummary) -> None:
        """Note an averaging round of ``expert``'s group (kept in memory and in the history file)."""
        with self._lock:
            self._add_round(expert, summary, persist=True)

    def set_generations(self, generations: list[GenerationSummary]) -> None:
        """Replace the list of published generations (oldest first); the API serves it from now on."""
        with self._lock:
            self._generations = list(generations)
        self._view = None  # rebuilt by the next view(), not only after the next poll

    def _add_round(self, expert: str, summary: RoundSummary, persist: bool) -> None:
        self._rounds.setdefault(expert, deque(maxlen=50)).append(summary)
        totals = self._round_totals.setdefault(expert, [0, 0, 0])
        totals[0 if summary.ok else 1] += 1
        totals[2] += summary.bytes_sent
        if persist and self.history is not None:
            self.history.add_round(RoundRow(expert=expert, **summary.model_dump()))

    def peers(self) -> list[PeerSummary]:
        now = time.time()
        out = []
        with self._lock:
            items = list(self._peers.items())
        for fp, state in items:
            info, prog = state.info, state.progress
            if info is None:
                continue  # progress without an announcement (or history only): wait for its NodeInfo
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
                    generation=info.generation,
                    software_version=info.software_version,
                    protocol_version=info.protocol_version,
                    shard=info.shard,
                    step=prog.step if prog else 0,
                    samples=prog.samples if prog else 0,
                    tokens=prog.tokens if prog else 0,
                    loss=_finite_or_none(loss),
                    loss_is_nan=loss is not None and math.isnan(loss),
                    samples_per_second=prog.samples_per_second if prog else 0.0,
                    peak_memory_bytes=prog.peak_memory_bytes if prog else 0,
                    rss_bytes=prog.rss_bytes if prog else None,
                    gpu_memory_bytes=prog.gpu_memory_bytes if prog else None,
                    last_seen_s=round(now - state.last_seen, 3),
                )
            )
        return sorted(out, key=lambda p: (p.expert, p.id))

    def view(self) -> SwarmView:
        """What the API serves: the view built after the last poll (built now if there was none)."""
        view = self._view
        if view is None:
            view = self._view = self._build_view()
        return view

    def snapshot(self) -> SwarmSnapshot:
        return self.view().snapshot

    def _build_view(self) -> SwarmView:
        peers = self.peers()
        with self._lock:
            series = {
                fp: (s.expert, list(s.series)) for fp, s in self._peers.items() if s.series and s.expert
            }
            rounds = {e: list(r) for e, r in self._rounds.items()}
            totals = {e: list(t) for e, t in self._round_totals.items()}
            generations = list(self._generations)
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
            experts=[_expert_summary(g) for g in groups],
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
            },
        )


def build_groups(
    peers: list[PeerSummary],
    series: dict[str, tuple[str, list[tuple[float, int, float]]]],
    rounds: dict[str, list[RoundSummary]],
    totals: dict[str, list[int]],
) -> list[GroupSummary]:
    """One :class:`GroupSummary` per expert that has a known peer."""
    known = {p.id for p in peers}
    groups = []
    for name in sorted({p.expert for p in peers}):
        members = [p for p in peers if p.expert == name]
        online = [p for p in members if p.online]
        losses = [p.loss for p in online if p.loss is not None]
        last = rounds.get(name, [])[-1] if rounds.get(name) else None
        current = [r for r in rounds.get(name, []) if last is not None and r.generation == last.generation]
        ok, failed, sent = totals.get(name, [0, 0, 0])
        curves = [
            LossSeries(
                peer=fp,
                t=[round(t, 3) for t, _, _ in points],
                step=[step for _, step, _ in points],
                loss=[_finite_or_none(loss) for _, _, loss in points],
            )
            for fp, (expert, points) in sorted(series.items())
            if expert == name and fp in known
        ]
        groups.append(
            GroupSummary(
                expert=name,
                members=len(online),
                peers=[p.id for p in members],
                samples_per_second=sum(p.samples_per_second for p in online),
                tokens=sum(p.tokens for p in members),
                mean_loss=sum(losses) / len(losses) if losses else None,
                outer_step=max((r.outer_step for r in current), default=None),  # on the current base
                last_round=last,
                rounds_ok=ok,
                rounds_failed=failed,
                bytes_sent=sent,
                loss=curves,
            )
        )
    return groups


def _expert_summary(group: GroupSummary) -> ExpertSummary:
    return ExpertSummary(
        expert=group.expert,
        members=group.members,
        samples_per_second=group.samples_per_second,
        tokens=group.tokens,
        mean_loss=group.mean_loss,
    )


_LIST_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


def _dump_list(model: type[BaseModel], items: list[Any]) -> bytes:
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        adapter = _LIST_ADAPTERS[model] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return adapter.dump_json(items)
