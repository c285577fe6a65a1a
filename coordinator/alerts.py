"""What deserves a person's attention, computed from the swarm view (pure functions, no I/O).

- ``stale_peer``: a peer stopped reporting (its records expired or are older than the stale limit)
- ``loss_nan``: a peer of a group reports a NaN loss
- ``loss_rising``: a group member's smoothed loss has stayed well above its typical earlier smoothed loss
- ``averaging_failed``: a group's latest averaging round failed
- ``member_excluded``: a group excluded a member whose updates it rejected repeatedly (a hostile or
  broken peer: its deltas are ignored for a while)
- ``version_mismatch``: a peer runs another cogen software or protocol version than the coordinator
- ``claims_failed``: the latest generation's spot-check found an expert's prequential claims false
  (it was ranked last and left out of the merge)
- ``generation_refused``: the publishing gate found every candidate of the next generation worse than
  its parent somewhere; nothing was published, the parent stays the base until the next try
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cogen.protocols.gate import GateReport

AlertKind = Literal[
    "stale_peer",
    "loss_nan",
    "loss_rising",
    "averaging_failed",
    "member_excluded",
    "version_mismatch",
    "claims_failed",
    "generation_refused",
]


class Alert(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: AlertKind
    severity: Literal["warning", "critical"]
    subject: str = Field(description="the peer id or expert the alert is about")
    expert: str | None = None
    message: str


class PeerFacts(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def expert(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def loss_is_nan(self) -> bool: ...
    @property
    def last_seen_s(self) -> float: ...
    @property
    def software_version(self) -> str: ...
    @property
    def protocol_version(self) -> int: ...


class RoundFacts(Protocol):
    @property
    def outer_step(self) -> int: ...
    @property
    def ok(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    @property
    def excluded(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class RisingRule:
    """A curve rises when its smoothed loss — the median of each ``window`` consecutive reports, which
    one noisy batch cannot move — has stayed more than ``tolerance`` (relative) above its typical
    smoothed loss before (the median of the earlier smoothed losses) for the last ``hold`` reports (a
    minimum duration: a short bump raises nothing).

    Typical, not best: a node reads its shard document by document, so a run of easy batches (a long
    repetitive file) drags a smoothed loss far below where training stands. On recorded healthy
    SmolLM2 runs (one batch per report, tests/data/recorded_losses.json) the smoothed loss stayed up to
    99 % above its best earlier value, but never more than 16 % above its typical one; the recorded
    diverging run is caught 15 reports after its loss took off."""

    window: int = 15
    hold: int = 8
    tolerance: float = 0.4


def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """The running median of the finite losses over ``window`` consecutive points (one per full window)."""
    finite = [x for x in losses if math.isfinite(x)]
    return [statistics.median(finite[i - window : i]) for i in range(window, len(finite) + 1)]


def loss_rise(losses: Sequence[float], rule: RisingRule = RisingRule()) -> float | None:
    """The sustained relative rise of a loss curve's smoothed loss over its typical earlier smoothed
    loss, if it is rising (see :class:`RisingRule`); ``None`` otherwise or while the curve is too short."""
    curve = smoothed(losses, rule.window)
    if len(curve) <= rule.hold:
        return None
    typical = statistics.median(curve[: -rule.hold])
    if typical <= 0:
        return None
    rise = min(curve[-rule.hold :]) / typical - 1.0
    return rise if rise > rule.tolerance else None


def compute_alerts(
    peers: Sequence[PeerFacts],
    losses: Mapping[str, Mapping[str, Sequence[float]]],
    last_rounds: Mapping[str, RoundFacts | None],
    software_version: str,
    protocol_version: int,
    rule: RisingRule = RisingRule(),
    flagged: Mapping[str, str] | None = None,
    refused: GateReport | None = None,
) -> list[Alert]:
    """All current alerts, most severe first.

    ``losses`` maps expert -> peer id -> that peer's losses in time order (NaN included);
    ``last_rounds`` maps expert -> its latest averaging round, or ``None`` before any; ``flagged``
    maps expert -> why the latest generation's spot-check refused its claims; ``refused`` is the
    publishing gate's newest refusal (no candidate passed: the parent stays the base).
    """
    alerts: list[Alert] = []
    for p in peers:
        if p.state == "stale":
            alerts.append(
                Alert(
                    kind="stale_peer",
                    severity="warning",
                    subject=p.id,
                    expert=p.expert,
                    message=f"peer {p.id} ({p.expert}) not heard from for {p.last_seen_s:.0f} s",
                )
            )
            continue
        if p.protocol_version != protocol_version or p.software_version != software_version:
            alerts.append(
                Alert(
                    kind="version_mismatch",
                    severity="critical" if p.protocol_version != protocol_version else "warning",
                    subject=p.id,
                    expert=p.expert,
                    message=f"peer {p.id} runs cogen {p.software_version} (protocol {p.protocol_version}); "
                    f"the coordinator runs {software_version} (protocol {protocol_version})",
                )
            )
    online = {p.id for p in peers if p.state != "stale"}
    nan_peers = {p.id for p in peers if p.loss_is_nan and p.id in online}
    for expert, by_peer in sorted(losses.items()):
        nan = sorted(
            pid for pid in by_peer if pid in online and (pid in nan_peers or _ends_nan(by_peer[pid]))
        )
        if nan:
            alerts.append(
                Alert(
                    kind="loss_nan",
                    severity="critical",
                    subject=expert,
                    expert=expert,
                    message=f"group {expert}: loss is NaN on {', '.join(nan)}",
                )
            )
        rising = {pid: loss_rise(series, rule) for pid, series in by_peer.items() if pid in online}
        worst = max(((r, pid) for pid, r in rising.items() if r is not None), default=None)
        if worst is not None:
            alerts.append(
                Alert(
                    kind="loss_rising",
                    severity="warning",
                    subject=expert,
                    expert=expert,
                    message=f"group {expert}: smoothed loss (median of {rule.window} reports) has stayed "
                    f"{worst[0]:.0%} above its typical earlier value for {rule.hold} reports "
                    f"(peer {worst[1]})",
                )
            )
    for expert, last in sorted(last_rounds.items()):
        if last is not None and not last.ok:
            alerts.append(
                Alert(
                    kind="averaging_failed",
                    severity="critical",
                    subject=expert,
                    expert=expert,
                    message=f"group {expert}: averaging round {last.outer_step} failed"
                    + (f": {last.error}" if last.error else ""),
                )
            )
        if last is not None and last.excluded:
            alerts.append(
                Alert(
                    kind="member_excluded",
                    severity="critical",
                    subject=expert,
                    expert=expert,
                    message=f"group {expert} excluded {', '.join(last.excluded[:4])}"
                    + (f" and {len(last.excluded) - 4} more" if len(last.excluded) > 4 else "")
                    + ": repeatedly rejected updates (a hostile or broken member)",
                )
            )
    for expert, reason in sorted((flagged or {}).items()):
        message = f"expert {expert}: its prequential claims did not hold ({reason}); not merged"
        alerts.append(
            Alert(kind="claims_failed", severity="critical", subject=expert, expert=expert, message=message)
        )
    if refused is not None:
        worse = sorted({d.domain for a in refused.attempts for d in a.domains if d.worse})
        alerts.append(Alert(
            kind="generation_refused", severity="warning", subject=f"generation-{refused.generation}",
            message=f"generation {refused.generation} not published: every candidate was worse than its "
            f"parent on {', '.join(worse) or 'a domain'} ({len(refused.attempts)} tried); the parent "
            "stays the base",
        ))  # fmt: skip
    return sorted(alerts, key=lambda a: (a.severity != "critical", a.kind, a.subject))


def _ends_nan(series: Sequence[float]) -> bool:
    return bool(series) and math.isnan(series[-1])
