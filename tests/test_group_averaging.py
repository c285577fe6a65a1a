"""Outer steps between real hivemind averagers (each with its own DHT process) on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hivemind
import pytest
import torch

from cogen.config import GroupConfig
from cogen.node.group import GroupAverager
from cogen.node.wire import estimate_bytes_sent, wire_compression
from cogen.protocols import RoundReport

SHAPES = [(64, 512), (300,), (16, 64)]  # one 8-bit tensor, two small fp16 ones


class Member:
    def __init__(self, dht: hivemind.DHT, cfg: GroupConfig, prefix: str):
        self.dht = dht
        self.params = [torch.nn.Parameter(torch.ones(shape), requires_grad=False) for shape in SHAPES]
        self.group = GroupAverager(dht, prefix, self.params, cfg)

    def train(self, delta: list[torch.Tensor]) -> None:
        """Pretend to have trained: weights = anchor - delta."""
        with torch.no_grad():
            for p, a, d in zip(self.params, self.group.anchor_state(), delta, strict=True):
                p.copy_(a - d)


def _members(n: int, cfg: GroupConfig, prefix: str) -> list[Member]:
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first] + [
        hivemind.DHT(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs(), start=True
        )
        for _ in range(n - 1)
    ]
    return [Member(dht, cfg, prefix) for dht in dhts]


@pytest.fixture
def make_group() -> Iterator:
    made: list[Member] = []

    def make(n: int, prefix: str, **overrides: object) -> list[Member]:
        cfg = GroupConfig(
            matchmaking_s=1.0, group_size=max(n, 2), averaging_timeout_s=30, sync_every=1000, **overrides
        )
        members = _members(n, cfg, prefix)
        made.extend(members)
        return members

    yield make
    for member in made:
        member.group.shutdown()
        member.dht.shutdown()


def _step_all(members: list[Member], weights: list[float]) -> list[RoundReport]:
    """One blocking outer step on every member at once; ``weights`` = samples since the last one."""
    totals = [m.group._samples_at_anchor + int(w) for m, w in zip(members, weights, strict=True)]
    with ThreadPoolExecutor(len(members)) as pool:
        return list(pool.map(lambda mt: mt[0].group.outer_step_now(mt[1]), zip(members, totals, strict=True)))


def _deltas(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.01 for shape in SHAPES]


def _expected_anchor(
    deltas: list[list[torch.Tensor]], weights: list[float], cfg: GroupConfig
) -> list[torch.Tensor]:
    """First outer step from anchor = 1: momentum = avg, update = avg + mu * momentum."""
    total = sum(weights)
    out = []
    for i in range(len(SHAPES)):
        avg = sum(w * d[i] for w, d in zip(weights, deltas, strict=True)) / total
        out.append(torch.ones(SHAPES[i]) - cfg.outer_lr * (1 + cfg.outer_momentum) * avg)
    return out


@pytest.mark.parametrize(("compression", "tolerance"), [("none", 1e-5), ("8bit", 2e-3)])
def test_members_apply_the_weighted_mean(make_group, compression: str, tolerance: float) -> None:
    members = make_group(3, f"mean{compression}", compression=compression)
    deltas = [_deltas(seed) for seed in range(3)]
    weights = [1.0, 2.0, 5.0]  # samples since the last outer step: a fast node counts more
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    reports = _step_all(members, weights)
    assert all(r.ok and r.group_size == 3 for r in reports), reports
    expected = _expected_anchor(deltas, weights, members[0].group.cfg)
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
    deltas = [_deltas(seed) for seed in range(3)]
    deltas[1][0][0, 0] = float("nan")
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    reports = _step_all(members, [1.0, 1.0, 1.0])
    assert not reports[1].ok and "non-finite" in reports[1].reason
    assert reports[0].ok and reports[2].ok and reports[0].group_size == 2
    expected = _expected_anchor([deltas[0], deltas[2]], [1.0, 1.0], members[0].group.cfg)
    for member in (members[0], members[2]):
        for got, want in zip(member.group.anchor_state(), expected, strict=True):
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    # the poisoned member fell back to its anchor: finite again
    assert all(torch.isfinite(p).all() for p in members[1].params)


def test_an_incomplete_average_is_detected_and_not_applied(make_group) -> None:
    (member,) = make_group(1, "verify", compression="8bit")
    group = member.group
    mine, theirs = _deltas(1), _deltas(2)
    mean = [(a + b) / 2 for a, b in zip(mine, theirs, strict=True)]
    gathered = [{"step": 0, "weight": 1.0, "proj": c.projections, "sq": c.sq_norms}
                for c in (group.verifier.checks(mine), group.verifier.checks(theirs))]  # fmt: skip
    assert group.verifier.verify(mean, gathered) is None
    # the failure mode of hivemind's all-reduce: part of the vector stays local, no exception
    partial = [t.clone() for t in mean]
    partial[0].view(-1)[: partial[0].numel() // 2] = mine[0].view(-1)[: partial[0].numel() // 2]
    assert "incomplete round" in (group.verifier.verify(partial, gathered) or "")
    nan = [t.clone() for t in mean]
    nan[2][0, 0] = float("inf")
    assert "not finite" in (group.verifier.verify(nan, gathered) or "")


def test_a_late_joiner_loads_the_group_state(make_group) -> None:
    members = make_group(2, "join", compression="none")
    for member, seed in zip(members, (1, 2), strict=True):
        member.train(_deltas(seed))
    assert all(r.ok for r in _step_all(members, [1.0, 1.0]))
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
    deltas = [_deltas(seed) for seed in (1, 2)]
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(lambda m: m.group.begin_round(10), members))
    # training goes on while the round runs: each member moves its weights a little more
    progress = [_deltas(seed + 10) for seed in (1, 2)]
    for member, extra in zip(members, progress, strict=True):
        with torch.no_grad():
            for p, e in zip(member.params, extra, strict=True):
                p.sub_(e)
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda m: m.group.finish_round(), members))
    assert all(r is not None and r.ok and r.group_size == 2 for r in reports), reports
    anchor = _expected_anchor(deltas, [10.0, 10.0], members[0].group.cfg)
    for member, extra in zip(members, progress, strict=True):
        for got, want in zip(member.group.anchor_state(), anchor, strict=True):
            assert torch.allclose(got, want, atol=1e-5)
        for p, a, e in zip(member.params, anchor, extra, strict=True):
            assert torch.allclose(p.detach(), a - e, atol=1e-5)  # new anchor + the progress made meanwhile
        assert not member.group.has_unaveraged(10)  # the anchor holds all samples up to the round start
        assert member.group.has_unaveraged(11)  # later samples go into the next round
