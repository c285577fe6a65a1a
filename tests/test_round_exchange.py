"""The round exchange between real DHT peers on 127.0.0.1: who may fetch a post, bounds, deadlines."""

from __future__ import annotations

import time
from collections.abc import Iterator

import hivemind
import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from cogen.node.codecs import DenseCodec
from cogen.node.exchange import Post, Received, RoundExchange
from cogen.node.robust_rounds import decode_delta
from cogen.node.rounds import tensors_digest
from cogen.node.wire import wire_compression
from cogen.protocols.group_round import RoundClaim


@pytest.fixture
def peers() -> Iterator[list[tuple[hivemind.DHT, RoundExchange]]]:
    # parallel torch work before the DHTs fork, as a node that trained before it joined has done: the
    # exchange copies tensors in the forked process, where OpenMP's threads are gone
    assert torch.ones(1 << 22).mul(2).sum().item() == 2 * (1 << 22)
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first] + [
        hivemind.DHT(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs(), start=True
        )
        for _ in range(2)
    ]
    exchanges = [RoundExchange(d, "test_exchange", max_bytes=1 << 20, wait_s=5.0) for d in dhts]
    for e in exchanges:
        e.start()
    yield list(zip(dhts, exchanges, strict=True))
    for e in exchanges:
        e.stop()
        assert not e.is_running()
    for d in dhts:
        d.shutdown()


def _serialized(n: int) -> list:
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    return [wire_compression("none", 4096).compress(t, CompressionInfo.from_tensor(t))]


def test_only_the_rounds_members_get_a_post_whole_and_in_time(peers) -> None:
    (a, ex_a), (b, ex_b), (_, ex_c) = peers
    tensors = _serialized(200_000)  # 800 KB: many 64 KiB stream chunks
    ex_a.post(b"round-1", Post(frozenset({str(b.peer_id)}), {"nonce": "ab"}, tensors))
    got = ex_b.fetch({a.peer_id: b"round-1"}, timeout=10.0)[a.peer_id]
    assert isinstance(got, Received) and got.metadata == {"nonce": "ab"}
    assert tensors_digest(got.tensors) == tensors_digest(tensors)
    assert torch.equal(deserialize_torch_tensor(got.tensors[0]), deserialize_torch_tensor(tensors[0]))
    # a peer that was not in the round gets nothing, nor does anyone for a round never posted
    assert ex_c.fetch({a.peer_id: b"round-1"}, timeout=10.0)[a.peer_id] == "has nothing for this round"
    start = time.monotonic()
    assert ex_b.fetch({a.peer_id: b"round-2"}, timeout=2.0)[a.peer_id] == "did not answer in time"
    assert time.monotonic() - start < 8.0


def test_a_post_published_while_the_request_waits_is_served(peers) -> None:
    (a, ex_a), (b, ex_b), _ = peers
    import threading

    later = threading.Timer(1.0, ex_a.post, (b"late", Post(frozenset({str(b.peer_id)}), {"x": 1})))
    later.start()
    try:
        got = ex_b.fetch({a.peer_id: b"late"}, timeout=10.0)[a.peer_id]
    finally:
        later.join()
    assert isinstance(got, Received) and got.metadata == {"x": 1} and got.tensors == []


def test_an_answer_over_the_size_bound_is_cut_off(peers) -> None:
    (a, ex_a), _, (c, ex_c) = peers
    ex_c.stop()  # one handler per name and daemon: the same peer with a smaller bound
    small = RoundExchange(c, "test_exchange", max_bytes=100_000, wait_s=5.0)
    small.start()
    try:
        ex_a.post(b"big", Post(frozenset({str(c.peer_id)}), {}, _serialized(200_000)))
        assert small.fetch({a.peer_id: b"big"}, timeout=10.0)[a.peer_id] == "sent over 100000 bytes"
    finally:
        small.stop()


def test_a_delta_that_does_not_match_its_claim_is_refused_before_decoding() -> None:
    """What ExchangeRounds accepts of a fetched delta: the claimed digest, this model's shapes, fp32."""
    codec = DenseCodec([torch.zeros(300)], wire_compression("none", 4096))
    good = _serialized(300)
    claim = RoundClaim(step=0, weight=1.0, elapsed_s=1.0, commit="0" * 64, digest=tensors_digest(good))
    assert isinstance(decode_delta(Received({}, good), claim, codec), list)
    other = _serialized(301)
    assert "digest" in str(decode_delta(Received({}, other), claim, codec))
    huge = _serialized(300)
    huge[0].size[:] = [1 << 30]  # a header that would make a decoder allocate 4 GB
    lying = claim.model_copy(update={"digest": tensors_digest(huge)})
    assert decode_delta(Received({}, huge), lying, codec) == "does not fit this model"
    assert "did not arrive" in str(decode_delta("did not answer in time", claim, codec))
