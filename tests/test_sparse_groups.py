"""``--compression sparse`` between real hivemind averagers on 127.0.0.1: the group applies the mean of
what its members sent, the rest waits in each member's error buffer, and a round with a part missing
is refused and leaves everything as it was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from group_members import (
    SHAPES,
    Member,
    complete,
    error_buffer,
    seeded_deltas,
    start_members,
    step_all,
)

from cogen.core.config import GroupConfig
from cogen.node.exchange import Post
from cogen.node.sparse import SparseCompressor
from cogen.node.wire import estimate_bytes_sent, wire_compression

CFG = dict(matchmaking_s=1.0, group_size=3, averaging_timeout_s=30, sync_every=1000, compression="sparse",
           sparse_chunk=1024, sparse_k=16, sparse_bits=4)  # fmt: skip


@pytest.fixture
def sparse_group() -> Iterator[list[Member]]:
    members = start_members(3, GroupConfig.model_validate(CFG), "sparse")
    yield members
    for member in members:
        member.group.shutdown()
        member.dht.shutdown()


def _sent(deltas: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What a member with an empty error buffer sends of ``deltas`` (decoded), and what it keeps (up to
    float rounding: a member computes its delta as anchor - weights)."""
    cfg = GroupConfig.model_validate(CFG)
    comp = SparseCompressor([torch.Size(s) for s in SHAPES], cfg.sparse_chunk, cfg.sparse_k, cfg.sparse_bits)
    sents = comp.compress(deltas)
    comp.commit()
    return [comp.decode(s).view(d.shape) for s, d in zip(sents, deltas, strict=True)], comp.error


def test_members_apply_the_mean_of_what_they_sent_and_keep_the_rest(sparse_group: list[Member]) -> None:
    members = sparse_group
    deltas = [seeded_deltas(seed) for seed in range(3)]
    weights = [1.0, 2.0, 5.0]
    for member, delta in zip(members, deltas, strict=True):
        member.train(delta)
    reports = step_all(members, weights)
    assert complete(reports), reports
    sent, kept = zip(*(_sent(d) for d in deltas), strict=True)
    cfg = members[0].group.cfg
    total = sum(weights)
    for member, own_kept in zip(members, kept, strict=True):
        assert member.group.outer_step == 1
        for i, got in enumerate(member.group.anchor_state()):
            avg = sum(w * s[i] for w, s in zip(weights, sent, strict=True)) / total
            want = torch.ones(SHAPES[i]) - cfg.outer_lr * (1 + cfg.outer_momentum) * avg
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
            assert int((avg != 0).sum()) <= 3 * 16 * -(-avg.numel() // 1024)  # only the kept positions
        for e, want in zip(error_buffer(member), own_kept, strict=True):
            assert torch.allclose(e, want, atol=1e-6, rtol=0)  # what it left out waits for the next round
    reference = members[0].group.anchor_state()
    for member in members[1:]:  # every member decoded the same bytes: the same weights, exactly
        assert all(torch.equal(a, b) for a, b in zip(member.group.anchor_state(), reference, strict=True))
    dense = estimate_bytes_sent([torch.zeros(s) for s in SHAPES], wire_compression("8bit", 4096), 3)
    assert 0 < reports[0].bytes_sent * 4 < dense  # far less than the 8-bit all-reduce would send


def test_a_round_with_a_missing_part_is_refused_and_leaves_everything_as_it_was(
    sparse_group: list[Member],
) -> None:
    members = sparse_group
    cheat = members[2].group.rounds.exchange
    honest_post = cheat.post

    def post_without_a_part(key: bytes, post: Post) -> None:  # serves one wire tensor fewer than claimed
        honest_post(key, Post(post.peers, post.metadata, list(post.tensors)[:-1]))

    cheat.post = post_without_a_part  # type: ignore[method-assign]
    for member, delta in zip(members, (seeded_deltas(s) for s in range(3)), strict=True):
        member.train(delta)
    reports = step_all(members, [1.0, 1.0, 1.0], lambda r: all(x.group_size == 3 for x in r[:2]))
    for report, member in zip(reports[:2], members[:2], strict=True):
        assert not report.ok and "missing or invalid" in report.reason, report
        assert member.group.outer_step == 0
        assert all(
            torch.equal(a, torch.ones(s)) for a, s in zip(member.group.anchor_state(), SHAPES, strict=True)
        )
        assert all(bool((e == 0).all()) for e in error_buffer(member))  # nothing was sent: nothing kept
    assert str(members[2].dht.peer_id) in reports[0].rejected
    cheat.post = honest_post  # type: ignore[method-assign]
    reports = step_all(members, [1.0, 1.0, 1.0])  # the same progress goes out in the next round
    assert complete(reports), reports
