"""The alert rules: stale peers, NaN or rising loss, failed averaging rounds, version mismatch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cogen.coordinator.alerts import RisingRule, compute_alerts, loss_rise

NAN = math.nan


@dataclass(frozen=True)
class Peer:
    id: str
    expert: str = "medical"
    state: str = "training"
    loss_is_nan: bool = False
    last_seen_s: float = 1.0
    software_version: str = "1.0"
    protocol_version: int = 1


@dataclass(frozen=True)
class Round:
    outer_step: int
    ok: bool
    error: str | None = None


def alerts(peers, losses=None, rounds=None):
    return compute_alerts(peers, losses or {}, rounds or {}, "1.0", 1)


def test_a_healthy_swarm_has_no_alerts() -> None:
    falling = [3.0 - 0.1 * i for i in range(20)]
    assert alerts([Peer("a"), Peer("b")], {"medical": {"a": falling, "b": falling}}) == []


def test_a_stale_peer_is_reported_once() -> None:
    found = alerts([Peer("a", state="stale", last_seen_s=42, software_version="0.9")])
    assert [(a.kind, a.subject) for a in found] == [("stale_peer", "a")]
    assert "42 s" in found[0].message


def test_version_mismatch_is_a_warning_and_protocol_mismatch_critical() -> None:
    found = {a.subject: a for a in alerts([Peer("a", software_version="0.9"), Peer("b", protocol_version=2)])}
    assert found["a"].kind == found["b"].kind == "version_mismatch"
    assert (found["a"].severity, found["b"].severity) == ("warning", "critical")
    assert "0.9" in found["a"].message


def test_a_nan_loss_alerts_its_group() -> None:
    found = alerts([Peer("a"), Peer("b")], {"medical": {"a": [2.0, 1.9, NAN], "b": [2.0, 1.8]}})
    assert [(a.kind, a.subject, a.severity) for a in found] == [("loss_nan", "medical", "critical")]
    assert "a" in found[0].message
    # the latest record's NaN flag counts even if the curve does not end in NaN yet
    found = alerts([Peer("a", loss_is_nan=True)], {"medical": {"a": [2.0]}})
    assert [a.kind for a in found] == ["loss_nan"]


def test_stale_peers_do_not_raise_loss_alerts() -> None:
    found = alerts([Peer("a", state="stale")], {"medical": {"a": [1.0] * 5 + [5.0] * 5 + [NAN]}})
    assert [a.kind for a in found] == ["stale_peer"]


def test_rising_loss() -> None:
    rule = RisingRule(window=3, tolerance=0.1)
    assert loss_rise([1.0] * 5, rule) is None  # too short for two windows... and flat
    assert loss_rise([3, 2, 1, 1, 1, 1], rule) is None  # falling
    assert loss_rise([2, 1, 1, 1, 1.05, 1.05, 1.05], rule) is None  # within tolerance
    rise = loss_rise([3, 2, 1, 1, 1, 1.5, 1.5, 1.5], rule)
    assert rise is not None and math.isclose(rise, 0.5)
    assert loss_rise([NAN, 3, 2, 1, 1, 1, 1.5, 1.5, NAN, 1.5], rule) is not None  # NaNs skipped
    found = compute_alerts([Peer("a")], {"medical": {"a": [3, 2, 1, 1, 1, 2, 2, 2]}}, {}, "1.0", 1, rule)
    assert [(a.kind, a.subject) for a in found] == [("loss_rising", "medical")]
    assert "100%" in found[0].message


def test_failed_averaging_round() -> None:
    found = alerts(
        [Peer("a")], rounds={"medical": Round(7, False, "timeout"), "code": Round(3, True), "x": None}
    )
    assert [(a.kind, a.subject) for a in found] == [("averaging_failed", "medical")]
    assert "round 7" in found[0].message and "timeout" in found[0].message


def test_critical_alerts_come_first() -> None:
    found = alerts(
        [Peer("a", state="stale"), Peer("b", protocol_version=3)], rounds={"legal": Round(1, False)}
    )
    assert [a.severity for a in found] == ["critical", "critical", "warning"]
