"""Groups of 4 on a real DHT (127.0.0.1), one member hostile: what each aggregator lets through.

The hostile member is a real :class:`GroupAverager` driven to send what an attacker would: a delta
scaled by 100, sign-flipped, or replaced by noise of its norm; a claimed weight of 1e30; a claimed
outer step of 10**15 (declared as its state-sharing priority too). Deltas are hand-made (weights =
anchor - delta), so the aggregate every honest member must have applied is known exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from group_members import Member, start_members

from cogen.core.config import GroupConfig
from cogen.node.aggregators import get_aggregator
from cogen.protocols import RoundReport

pytestmark = pytest.mark.slow
SHAPES = [(32, 64), (100,)]
HOSTILE = 3  # the index of the hostile member
ATTACKS: dict[str, Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]] = {
    "scaled": lambda d, g: [t * 100 for t in d],
    "sign_flip": lambda d, g: [-t for t in d],
    "noise": lambda d, g: _noise_like(d, g),
    "weight": lambda d, g: d,
    "step": lambda d, g: d,
}


def _noise_like(delta: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    noise = [torch.randn(t.shape, generator=g) for t in delta]
    return [n * (_norm(delta) / _norm(noise)) for n in noise]


def _norm(tensors: list[torch.Tensor]) -> float:
    return sum(float((t.double() ** 2).sum()) for t in tensors) ** 0.5


@pytest.fixture
def group_of_four() -> Iterator[Callable[[str], list[Member]]]:
    made: list[Member] = []

    def make(aggregator: str) -> list[Member]:
        cfg = GroupConfig(matchmaking_s=1.5, group_size=4, averaging_timeout_s=30, sync_every=1000,
                          compression="none", aggregator=aggregator, reject_limit=2)  # type: ignore[arg-type]  # fmt: skip
        members = start_members(4, cfg, f"robust{aggregator}", SHAPES)
        made.extend(members)
        return members

    yield make
    for member in made:
        member.group.shutdown()
        member.dht.shutdown()


def _met(members: list[Member], reports: list[RoundReport]) -> bool:
    """Whether the honest members applied a round of all four (the hostile one counted if dropped)."""
    hostile = str(members[HOSTILE].dht.peer_id)
    return all(
        r.ok and r.group_size + (hostile in r.rejected or hostile in r.excluded) == 4
        for r in reports[:HOSTILE]
    )


def _round(
    members: list[Member],
    deltas: list[list[torch.Tensor]],
    attack: str,
    accept: Callable[[list[Member], list[RoundReport]], bool] = _met,
) -> list[RoundReport]:
    """One outer step on all four at once, retried (rewound) until all four met in one group."""
    snaps = [(m.group.anchor_state(), m.group.momentum_state(), m.group.outer_step, m.group.samples_at_anchor)
             for m in members]  # fmt: skip
    deadline = time.monotonic() + 150
    while True:
        for member, delta in zip(members, deltas, strict=True):
            member.train(delta)
        totals = [m.group.samples_at_anchor + 10 for m in members]
        if attack == "weight":
            totals[HOSTILE] = members[HOSTILE].group.samples_at_anchor + 10**30
        if attack == "step":
            members[HOSTILE].group.outer_step = 10**15  # also its declared state-sharing priority
        with ThreadPoolExecutor(4) as pool:
            reports = list(
                pool.map(lambda mt: mt[0].group.outer_step_now(mt[1]), zip(members, totals, strict=True))
            )
        if accept(members, reports) or time.monotonic() > deadline:
            return reports
        for member, (anchor, momentum, step, samples) in zip(members, snaps, strict=True):
            member.group.restore(anchor, momentum, step, samples)


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "centered_clip"])
def test_one_hostile_member_cannot_steer_a_robust_group(group_of_four, aggregator: str) -> None:
    members = group_of_four(aggregator)
    honest_ids = [str(m.dht.peer_id) for m in members[:HOSTILE]]
    hostile_id = str(members[HOSTILE].dht.peer_id)
    cfg = members[0].group.cfg
    g = torch.Generator().manual_seed(0)
    for attack, tamper in ATTACKS.items():
        for member in members:
            member.group.exclusions.clear()
        rejected_in = []
        for round_ in range(2):
            honest = [[torch.randn(s, generator=g) * 0.01 for s in SHAPES] for _ in range(HOSTILE)]
            sent = (
                tamper(honest[0], g) if attack not in ("weight", "step") else [t.clone() for t in honest[0]]
            )
            before, momentum = members[0].group.anchor_state(), members[0].group.momentum_state()
            reports = _round(members, [*honest, sent], attack)
            assert all(r.ok for r in reports[:HOSTILE]), (attack, reports)
            anchors = [m.group.anchor_state() for m in members[:HOSTILE]]
            for other in anchors[1:]:  # every honest member applied the very same aggregate
                assert all(torch.equal(a, b) for a, b in zip(anchors[0], other, strict=True)), attack
            report = reports[0]
            dropped = hostile_id in report.rejected or hostile_id in report.excluded
            if dropped:
                rejected_in.append(round_)
            used = honest if dropped else [*honest, sent]
            assert report.group_size == len(used), (attack, report)
            agg = get_aggregator(aggregator)(used, [1.0] * len(used))
            for a, b, m, d in zip(anchors[0], before, momentum, agg, strict=True):  # the outer step, by hand
                m_new = cfg.outer_momentum * m + d
                assert torch.allclose(a, b - cfg.outer_lr * (d + cfg.outer_momentum * m_new), atol=1e-5), (
                    attack
                )
            honest_mean = [torch.stack([h[i] for h in honest]).mean(0) for i in range(len(SHAPES))]
            spread = max(_norm([x - y for x, y in zip(h, honest_mean, strict=True)]) for h in honest)
            error = _norm([x - y for x, y in zip(agg, honest_mean, strict=True)])
            assert error < 1.5 * spread, (attack, error, spread)  # the aggregate stays among the honest ones
            assert members[0].group.outer_step < 1000, attack  # the step claim was not believed
        if attack in ("scaled", "weight", "step"):
            assert rejected_in == [0, 1], (attack, rejected_in)
            assert reports[0].excluded == [hostile_id], (attack, reports[0])  # reported for the dashboard
            assert all(r.excluded == [hostile_id] for r in reports[:HOSTILE])
        assert not set(honest_ids) & set(reports[0].excluded), reports[0]


def test_a_mean_group_refuses_the_rounds_it_cannot_leave_a_hostile_member_out_of(group_of_four) -> None:
    """hivemind's all-reduce has the hostile delta in the average already: an update, weight or step
    that the checks reject refuses the round (the anchors do not move) and excludes the member; what
    the checks cannot tell from an honest update (a flipped sign) goes into the mean: the harm that
    ``bench.byzantine`` measures, and the robust aggregators bound."""
    members = group_of_four("mean")
    hostile_id = str(members[HOSTILE].dht.peer_id)
    g = torch.Generator().manual_seed(1)

    def refused(members: list[Member], reports: list[RoundReport]) -> bool:
        return all(not r.ok and "refused" in r.reason and r.group_size == 4 for r in reports[:HOSTILE])

    for attack in ("scaled", "weight", "step"):
        for member in members:
            member.group.exclusions.clear()
        for _ in range(2):
            honest = [[torch.randn(s, generator=g) * 0.01 for s in SHAPES] for _ in range(HOSTILE)]
            sent = ATTACKS[attack](honest[0], g)
            before = [(m.group.anchor_state(), m.group.outer_step) for m in members[:HOSTILE]]
            reports = _round(members, [*honest, sent], attack, refused)
            assert refused(members, reports), (attack, reports)
            assert all(hostile_id in r.rejected or hostile_id in r.excluded for r in reports[:HOSTILE])
            for member, (anchor, step) in zip(members[:HOSTILE], before, strict=True):
                assert member.group.outer_step == step, attack  # a step of 10**15 is not believed either
                assert all(
                    torch.equal(a, b) for a, b in zip(member.group.anchor_state(), anchor, strict=True)
                )
        assert all(r.excluded == [hostile_id] for r in reports[:HOSTILE]), (attack, reports)
    for member in members:
        member.group.exclusions.clear()
    members[HOSTILE].group.outer_step = members[0].group.outer_step  # its own step, honest again
    honest = [[torch.randn(s, generator=g) * 0.01 for s in SHAPES] for _ in range(HOSTILE)]
    reports = _round(members, [*honest, ATTACKS["sign_flip"](honest[0], g)], "sign_flip")
    assert all(r.ok and r.group_size == 4 and not r.rejected for r in reports), reports
