"""Outer steps between real hivemind averagers (each with its own DHT process) on 127.0.0.1.

The members and the retried rounds among them are ``group_members.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hivemind
import pytest
import torch
from group_members import (
    SHAPES,
    Member,
    complete,
    expected_anchor,
    retrying,
    seeded_deltas,
    start_members,
    step_all,
)
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from cogen.core.config import GroupConfig
from cogen.node.wire import (
    SAMPLE_MAX,
    RoundVerifier,
    all_finite,
    estimate_bytes_sent,
    round_seed,
    wire_compression,
)
from cogen.protocols import RoundReport


@pytest.fixture
def make_group() -> Iterator:
    made: list[Member] = []

    def make(n: int, prefix: str, **overrides: object) -> list[Member]:
        settings = {
            "matchmaking_s": 1.0,
            "group_size": max(n, 2),
            "averaging_timeout_s": 30,
            "sync_every": 1000,
        }
        cfg = GroupConfig.model_validate({**settings, **overrides})
        members = start_members(n, cfg, prefix)
        made.extend(members)
        return members

    yield make
    for member in made:
        member.group.shutdown()
        member.dht.shutdown()


@pytest.mark.parametrize(("compression", "tolerance"), [("none", 1e-5), ("8bit", 2e-3)])
def test_members_apply_the_weighted_mean(make_group, compression: str, tolerance: float) -> None:
    members = make_group(3, f"mean{compression}", compression=compression)
    deltas = [seeded_deltas(seed) for seed in range(3)]
    weights = [1.0, 2.0, 5.0]  # samples since the last outer step: a fast node counts more
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    reports = step_all(members, weights)
    assert all(r.ok and r.group_size == 3 for r in reports), reports
    expected = expected_anchor(deltas, weights, members[0].group.cfg)
    for member in members:
        assert member.group.outer_step == 1
        for got, want, p in zip(member.group.anchor_state(), expected, member.params, strict=True):
            assert torch.allclose(got, want, atol=tolerance, rtol=0), (got - want).abs().max()
            assert torch.equal(p.detach(), got)  # training continues from the new anchor
    # all members hold (nearly) the same weights; the spread is the wire's precision
    reference = members[0].group.anchor_state()
    spread = max(
        (a - b).abs().max().item()
        for m in members[1:]
        for a, b in zip(m.group.anchor_state(), reference, strict=True)
    )
    assert spread <= tolerance
    assert reports[0].bytes_sent > 0


def test_a_member_with_nan_is_left_out_and_does_not_poison_the_group(make_group) -> None:
    members = make_group(3, "poison", compression="none")
    deltas = [seeded_deltas(seed) for seed in range(3)]
    deltas[1][0][0, 0] = float("nan")
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    reports = step_all(  # the round the test is about: the two finite members average, the third is left out
        members,
        [1.0, 1.0, 1.0],
        lambda r: not r[1].ok and all(r[i].ok and r[i].group_size == 2 for i in (0, 2)),
    )
    assert not reports[1].ok and "non-finite" in reports[1].reason
    assert reports[0].ok and reports[2].ok and reports[0].group_size == 2
    expected = expected_anchor([deltas[0], deltas[2]], [1.0, 1.0], members[0].group.cfg)
    for member in (members[0], members[2]):
        for got, want in zip(member.group.anchor_state(), expected, strict=True):
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    # the poisoned member fell back to its anchor: finite again
    assert all(torch.isfinite(p).all() for p in members[1].params)


def test_an_incomplete_average_is_detected_and_not_applied(make_group) -> None:
    (member,) = make_group(1, "verify", compression="8bit")
    verifier = member.group.rounds.verifier
    probe = verifier.probe(round_seed([b"a", b"b"]))
    mine, theirs = seeded_deltas(1), seeded_deltas(2)
    mean = [(a + b) / 2 for a, b in zip(mine, theirs, strict=True)]
    checks = [verifier.checks(mine, probe), verifier.checks(theirs, probe)]
    assert verifier.verify(mean, [1.0, 1.0], checks, probe) is None
    # the failure mode of hivemind's all-reduce: part of the vector stays local, no exception
    partial = [t.clone() for t in mean]
    partial[0].view(-1)[: partial[0].numel() // 2] = mine[0].view(-1)[: partial[0].numel() // 2]
    assert "incomplete round" in (verifier.verify(partial, [1.0, 1.0], checks, probe) or "")
    nan = [t.clone() for t in mean]
    nan[2][0, 0] = float("inf")
    assert "not finite" in (verifier.verify(nan, [1.0, 1.0], checks, probe) or "")


def test_sampled_checks_catch_a_part_left_local_and_any_nan() -> None:
    """Above SAMPLE_MAX values the checks look at a sample; one hivemind part (2^17 fp32 values, at
    an arbitrary offset) left local must still fail the round, and a NaN anywhere must too."""
    shapes = [(1024, 1024)] * 4 + [(300,)]
    g = torch.Generator().manual_seed(7)
    mine, theirs = ([torch.randn(s, generator=g) * 0.01 for s in shapes] for _ in range(2))
    verifier = RoundVerifier(mine, "8bit")
    probe = verifier.probe(round_seed([b"x", b"y"]))
    total = sum(t.numel() for t in mine)
    assert total > SAMPLE_MAX and probe.sampled <= SAMPLE_MAX < total  # the sample is in use
    wire = wire_compression("8bit", 4096)
    mean = [  # what the round returns: the mean, through the real 8-bit wire format
        deserialize_torch_tensor(wire.compress((a + b) / 2, CompressionInfo.from_tensor(a)))
        for a, b in zip(mine, theirs, strict=True)
    ]
    checks = [verifier.checks(mine, probe), verifier.checks(theirs, probe)]
    assert verifier.verify(mean, [1.0, 1.0], checks, probe) is None
    partial = [t.clone() for t in mean]
    part = slice(300_001, 300_001 + (1 << 17))
    partial[2].view(-1)[part] = mine[2].view(-1)[part]
    assert "incomplete round" in (verifier.verify(partial, [1.0, 1.0], checks, probe) or "")
    # a value outside the sample: the chunks' checks cannot see it, the finiteness pass does
    sampled = set(probe.index[1].tolist())
    unsampled = next(i for i in range(mine[1].numel()) if i not in sampled)
    poisoned = [t.clone() for t in mean]
    poisoned[1].view(-1)[unsampled] = float("nan")
    assert all(math.isfinite(q) for q in verifier.checks(poisoned, probe).sq_norms)
    assert not all_finite(poisoned) and all_finite(mean)
    assert "not finite" in (verifier.verify(poisoned, [1.0, 1.0], checks, probe) or "")


def test_a_late_joiner_loads_the_group_state(make_group) -> None:
    members = make_group(2, "join", compression="none")
    for member, seed in zip(members, (1, 2), strict=True):
        member.train(seeded_deltas(seed))
    assert all(r.ok for r in step_all(members, [1.0, 1.0]))
    joiner = Member(
        hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=members[0].dht.get_visible_maddrs(),
                     start=True),
        members[0].group.cfg, "join",
    )  # fmt: skip
    try:
        assert joiner.group.join()
        assert joiner.group.outer_step == 1
        for a, b, p in zip(
            joiner.group.anchor_state(), members[0].group.anchor_state(), joiner.params, strict=True
        ):
            assert torch.equal(a, b) and torch.equal(p.detach(), a)
    finally:
        joiner.group.shutdown()
        joiner.dht.shutdown()


def test_byte_estimate_reflects_the_wire_format() -> None:
    tensors = [torch.zeros(1 << 16)]
    fp32 = estimate_bytes_sent(tensors, wire_compression("none", 4096), 2)
    assert fp32 == 4 << 16  # half out, half back, 4 bytes per element
    assert estimate_bytes_sent(tensors, wire_compression("8bit", 4096), 2) == fp32 // 4
    assert estimate_bytes_sent(tensors, wire_compression("8bit", 4096), 1) == 0


def test_overlapped_rounds_keep_the_progress_made_while_averaging(make_group) -> None:
    members = make_group(2, "overlap", compression="none")
    deltas = [seeded_deltas(seed) for seed in (1, 2)]
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    progress = [seeded_deltas(seed + 10) for seed in (1, 2)]

    def attempt() -> list[RoundReport]:
        with ThreadPoolExecutor(2) as pool:
            assert all(pool.map(lambda m: m.group.begin_round(10), members))
        # training goes on while the round runs: each member moves its weights a little more
        for member, extra in zip(members, progress, strict=True):
            with torch.no_grad():
                for p, e in zip(member.params, extra, strict=True):
                    p.sub_(e)
        with ThreadPoolExecutor(2) as pool:
            return [r for r in pool.map(lambda m: m.group.finish_round(), members) if r is not None]

    reports = retrying(members, attempt, lambda r: len(r) == 2 and complete(r))
    assert all(r is not None and r.ok and r.group_size == 2 for r in reports), reports
    anchor = expected_anchor(deltas, [10.0, 10.0], members[0].group.cfg)
    for member, extra in zip(members, progress, strict=True):
        for got, want in zip(member.group.anchor_state(), anchor, strict=True):
            assert torch.allclose(got, want, atol=1e-5)
        for p, a, e in zip(member.params, anchor, extra, strict=True):
            assert torch.allclose(p.detach(), a - e, atol=1e-5)  # new anchor + the progress made meanwhile
        assert not member.group.has_unaveraged(10)  # the anchor holds all samples up to the round start
        assert member.group.has_unaveraged(11)  # later samples go into the next round


def test_drift_between_lossy_members_is_reported_and_stays_bounded(make_group) -> None:
    """8-bit rounds leave the members' anchors slightly apart (each keeps its own part of the mean
    undecoded); every ``sync_every`` outer steps they average anchors exactly, and the report of
    that round says how far each member was from the mean. Over many steps that spread stays small."""
    sync_every, steps = 3, 12
    members = make_group(3, "drift", compression="8bit", sync_every=sync_every)
    synced: list[list[RoundReport]] = []
    spreads: list[float] = []  # between syncs: the largest difference between two members' anchors
    for step in range(1, steps + 1):
        for i, member in enumerate(members):
            member.train(seeded_deltas(100 * step + i))  # weights ~1 (the anchor), deltas ~0.01
        synced_round = step % sync_every == 0  # also needs the exact sync of anchors to go through
        reports = step_all(
            members,
            [1.0, 2.0, 3.0],
            lambda r, s=synced_round: complete(r) and (not s or all(x.drift is not None for x in r)),
        )
        assert all(r.ok and r.group_size == 3 for r in reports), reports
        assert all(r is m.group.last_round for r, m in zip(reports, members, strict=True))
        anchors = [m.group.anchor_state() for m in members]
        spread = max(
            (a - b).abs().max().item()
            for other in anchors[1:]
            for a, b in zip(other, anchors[0], strict=True)
        )
        if step % sync_every:
            assert all(r.drift is None and r.drift_relative is None for r in reports), reports
            spreads.append(spread)
        else:
            synced.append(reports)
            assert spread <= 1e-6, spread  # right after the exact sync they agree again
    assert len(synced) == steps // sync_every
    assert 0 < max(spreads) < 1e-2, spreads  # lossy: members differ between syncs, but not by much
    for reports in synced:
        for r in reports:
            assert r.drift is not None and r.drift_relative is not None, r
            assert 0 < r.drift < 1e-2 and 0 < r.drift_relative < 2e-3, r
    first = max(r.drift or 0.0 for r in synced[0])
    assert max(r.drift or 0.0 for r in synced[-1]) <= 3 * first  # bounded: no walk away over the steps


def test_a_stopping_member_does_not_wait_for_a_round_that_holds_its_tensors(make_group) -> None:
    """hivemind keeps an averager's tensors locked for a whole all-reduce, also one this member just
    abandoned: reporting that round and saving the state on the way out must not wait for the lock."""
    (member,) = make_group(1, "held")
    g = member.group
    member.train([torch.full(shape, 0.1) for shape in SHAPES])
    assert g.begin_round(total_samples=8)
    delta_lock, state_lock = g.delta_averager.lock_averaged_tensors, g.state_averager.lock_averaged_tensors
    assert delta_lock.acquire(timeout=10) and state_lock.acquire(timeout=10)  # as an all-reduce in flight
    try:
        g.stop.set()
        start = time.monotonic()
        report = g.finish_round()
        assert report is not None and not report.ok and "abandoned" in report.reason
        with pytest.raises(TimeoutError, match="held the group's state"):
            g.state_copy(timeout_s=0.5)
        assert time.monotonic() - start < 5.0
    finally:
        delta_lock.release()
        state_lock.release()
    anchor, momentum = g.state_copy(timeout_s=5.0)  # once the round lets go, the state is read as usual
    assert [tuple(a.shape) for a in anchor] == SHAPES and all(float(m.abs().sum()) == 0 for m in momentum)
