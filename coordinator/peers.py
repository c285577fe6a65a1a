"""What the monitor keeps of each peer, and the summaries the API shows of peers and expert groups.

:class:`PeerState` is the last ``NodeInfo`` and ``TrainingProgress`` seen of one peer plus its recent
loss points; :func:`peer_summaries` and :func:`build_groups` turn those states into the API's
:class:`PeerSummary` and :class:`GroupSummary` (a peer not heard from for a while shows as ``stale``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cogen.coordinator.schemas import ExpertSummary, GroupSummary, LossSeries, PeerSummary, RoundSummary
from cogen.protocols import NodeInfo, TrainingProgress

#: loss points per peer kept in memory for charts and alerts (the history file may keep more)
SERIES_POINTS = 300


@dataclass
class PeerState:
    info: NodeInfo | None = None
    progress: TrainingProgress | None = None
    last_seen: float = 0.0
    online: bool = False
    first_seen: float = field(default_factory=time.time)
    expert: str = ""
    series: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def peer_summaries(
    items: Iterable[tuple[str, PeerState]], now: float, stale_after_s: float
) -> list[PeerSummary]:
    """One :class:`PeerSummary` per announced peer (by fingerprint), sorted by expert and id."""
    out = []
    for fp, state in items:
        info, prog = state.info, state.progress
        if info is None:
            continue  # progress without an announcement (or history only): wait for its NodeInfo
        stale = not state.online or now - state.last_seen > stale_after_s
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
                model=info.model,
                model_sha256=info.model_sha256,
                software_version=info.software_version,
                protocol_version=info.protocol_version,
                shard=info.shard,
                step=prog.step if prog else 0,
                samples=prog.samples if prog else 0,
                tokens=prog.tokens if prog else 0,
                loss=finite_or_none(loss),
                loss_is_nan=loss is not None and math.isnan(loss),
                samples_per_second=prog.samples_per_second if prog else 0.0,
                peak_memory_bytes=prog.peak_memory_bytes if prog else 0,
                rss_bytes=prog.rss_bytes if prog else None,
                gpu_memory_bytes=prog.gpu_memory_bytes if prog else None,
                last_seen_s=round(now - state.last_seen, 3),
            )
        )
    return sorted(out, key=lambda p: (p.expert, p.id))


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
                loss=[finite_or_none(loss) for _, _, loss in points],
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


def expert_summary(group: GroupSummary) -> ExpertSummary:
    return ExpertSummary(
        expert=group.expert,
        members=group.members,
        samples_per_second=group.samples_per_second,
        tokens=group.tokens,
        mean_loss=group.mean_loss,
    )
