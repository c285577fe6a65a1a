"""Real group members for the averaging tests: hivemind averagers on 127.0.0.1, and rounds among them.

A :class:`Member` is a :class:`~cogen.node.group.GroupAverager` over its own DHT process and parameters
of :data:`SHAPES`; :func:`step_all` runs one blocking outer step on every member at once, retried on a
fresh copy of the state until the round is the one the test is about (:func:`retrying`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import hivemind
import torch

from cogen.core.config import GroupConfig
from cogen.node.group import GroupAverager
from cogen.protocols import RoundReport

SHAPES = [(64, 512), (300,), (16, 64)]  # one 8-bit tensor, two small fp16 ones


class Member:
    def __init__(
        self, dht: hivemind.DHT, cfg: GroupConfig, prefix: str, shapes: Sequence[tuple[int, ...]] = SHAPES
    ):
        self.dht = dht
        self.params = [torch.nn.Parameter(torch.ones(shape), requires_grad=False) for shape in shapes]
        self.group = GroupAverager(dht, prefix, self.params, cfg)

    def train(self, delta: list[torch.Tensor]) -> None:
        """Pretend to have trained: weights = anchor - delta."""
        with torch.no_grad():
            for p, a, d in zip(self.params, self.group.anchor_state(), delta, strict=True):
                p.copy_(a - d)


def start_members(
    n: int, cfg: GroupConfig, prefix: str, shapes: Sequence[tuple[int, ...]] = SHAPES
) -> list[Member]:
    """``n`` members of one group, each on its own DHT; the first one's addresses start the others."""
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first] + [
        hivemind.DHT(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs(), start=True
        )
        for _ in range(n - 1)
    ]
    return [Member(dht, cfg, prefix, shapes) for dht in dhts]


Snapshot = tuple[list[torch.Tensor], list[torch.Tensor], int, int, list[torch.Tensor], list[torch.Tensor]]


def error_buffer(member: Member) -> list[torch.Tensor]:
    """The member's sparse error feedback (what it did not send yet); empty for a dense wire format."""
    compressor = getattr(getattr(member.group.rounds, "codec", None), "compressor", None)
    return compressor.error if compressor is not None else []


def snapshot(member: Member) -> Snapshot:
    """What a member holds before a round: its group state, its weights and its error feedback."""
    g = member.group
    return (
        g.anchor_state(),
        g.momentum_state(),
        g.outer_step,
        g.samples_at_anchor,
        [p.detach().clone() for p in member.params],
        [e.clone() for e in error_buffer(member)],
    )


def rewind(member: Member, snap: Snapshot) -> None:
    """Put a member back to a :func:`snapshot`."""
    anchor, momentum, step, samples, params, error = snap
    member.group.restore(anchor, momentum, step, samples)
    with torch.no_grad():
        for p, saved in zip(member.params, params, strict=True):
            p.copy_(saved)
        for e, saved in zip(error_buffer(member), error, strict=True):
            e.copy_(saved)


def retrying(
    members: list[Member],
    attempt: Callable[[], list[RoundReport]],
    accept: Callable[[list[RoundReport]], bool],
) -> list[RoundReport]:
    """Run one round on all members until ``accept`` holds, within a deadline. On a loaded machine
    hivemind sometimes returns a partial round ("received 3.9% results"), which cogen refuses; in a swarm
    the next round covers it. Here every member is rewound to the state before the round and the same
    round is tried again, so that what the tests assert about a round holds for a complete one."""
    snaps = [snapshot(m) for m in members]
    deadline = time.monotonic() + 120
    while True:
        reports = attempt()
        if accept(reports) or time.monotonic() > deadline:
            return reports
        for member, snap in zip(members, snaps, strict=True):
            rewind(member, snap)


def complete(reports: list[RoundReport]) -> bool:
    """Every member applied the round, all in one group."""
    return all(r.ok and r.group_size == len(reports) for r in reports)


def step_all(
    members: list[Member], weights: list[float], accept: Callable[[list[RoundReport]], bool] = complete
) -> list[RoundReport]:
    """One blocking outer step on every member at once; ``weights`` = samples since the last one.
    Retried (see :func:`retrying`) until ``accept``: by default, every member applied it in one group."""

    def attempt() -> list[RoundReport]:
        totals = [m.group.samples_at_anchor + int(w) for m, w in zip(members, weights, strict=True)]
        with ThreadPoolExecutor(len(members)) as pool:
            return list(
                pool.map(lambda mt: mt[0].group.outer_step_now(mt[1]), zip(members, totals, strict=True))
            )

    return retrying(members, attempt, accept)


def seeded_deltas(seed: int) -> list[torch.Tensor]:
    """Seeded pseudo-gradients of :data:`SHAPES`, about 0.01."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.01 for shape in SHAPES]


def expected_anchor(
    deltas: list[list[torch.Tensor]], weights: list[float], cfg: GroupConfig
) -> list[torch.Tensor]:
    """First outer step from anchor = 1: momentum = avg, update = avg + mu * momentum."""
    total = sum(weights)
    out = []
    for i in range(len(SHAPES)):
        avg = sum(w * d[i] for w, d in zip(weights, deltas, strict=True)) / total
        out.append(torch.ones(SHAPES[i]) - cfg.outer_lr * (1 + cfg.outer_momentum) * avg)
    return out
