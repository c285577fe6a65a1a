"""A permissioned swarm on 127.0.0.1: strangers, revoked and expired members are refused everywhere a
peer acts (DHT requests, averaging rounds, state downloads); members are served. Real hivemind DHTs
and averagers (their own processes), hivemind's real token-authorizer path, the real ``cogen swarm``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import hivemind
import pytest
import torch
from access_helpers import SWARM, TTL_S, Owner, net, owner_fixture  # noqa: F401 - the owner fixture
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter

from cogen.app.swarm import main as swarm_main
from cogen.core.averagers import GroupStateAverager
from cogen.core.exit_codes import ExitCode
from cogen.core.procs import wait_for
from cogen.core.swarm import NetworkError, SwarmClient
from cogen.protocols import MemberInfo, swarm_key

pytestmark = pytest.mark.slow

PREFIX = "test_medical_g1_state"


def stored_and_seen(writer: hivemind.DHT, reader: hivemind.DHT, key: str) -> bool:
    """Whether a fresh value ``writer`` stores now reaches ``reader`` (stored on it or served to it)."""
    value = time.monotonic_ns()
    writer.store(key, value, get_dht_time() + 60)
    found = reader.get(key, latest=True)
    return found is not None and found.value == value


async def _codes(responses: Any) -> list[int] | str:
    """The codes a refused stream answered, or ``"closed"`` when the member closed it before its one
    refusal reached us (libp2p may drop a message its handler sent just before returning, and our write
    into a stream the member already closed fails): both are a refusal, which the member logs."""
    try:
        return [m.code async for m in aiter_with_timeout(await responses, 30)]
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed"


async def _direct_calls(p2p: P2P, peer: str) -> tuple[list[int] | str, int, list[int] | str]:
    """Call a member's averager RPCs directly over libp2p: join a round, download its state, send an
    all-reduce part. Returns the join's codes, how many state parts came back, the part's codes."""
    stub = GroupStateAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=PREFIX)
    join = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 30, group_key=PREFIX)
    joined = await _codes(stub.rpc_join_group(join))
    download = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
    downloaded = [m async for m in aiter_with_timeout(download, 30)]
    part = averaging_pb2.AveragingData(group_id=b"g", peer_id=p2p.peer_id.to_bytes(), weight=1.0)
    aggregated = await _codes(stub.rpc_aggregate_part(as_aiter(part)))
    return joined, len(downloaded), aggregated


def stranger_calls(maddrs: list[str], peer: str) -> tuple[str, list[int] | str, int, list[int] | str]:
    """:func:`_direct_calls` from a fresh libp2p peer with no credential; its peer id first."""

    async def run() -> tuple[str, list[int] | str, int, list[int] | str]:
        p2p = await P2P.create(initial_peers=maddrs)
        try:
            return (str(p2p.peer_id), *await _direct_calls(p2p, peer))
        finally:
            await p2p.shutdown()

    return asyncio.run(run())


def download_parts(client: SwarmClient, peer: str) -> int:
    """How many state parts ``peer``'s averager sends to ``client``'s libp2p peer id when asked directly."""

    async def run() -> int:
        p2p = await client.dht.replicate_p2p()
        stub = GroupStateAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=PREFIX)
        download = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        return len([m async for m in aiter_with_timeout(download, 30)])

    return asyncio.run(run())


def averager(client: SwarmClient, value: float) -> GroupStateAverager:
    return GroupStateAverager(
        [torch.full((8,), value)], client.dht, prefix=PREFIX, target_group_size=2, min_group_size=2,
        min_matchmaking_time=2.0, request_timeout=1.0, metadata=lambda: {"peer": client.peer_id}, start=True,
    )  # fmt: skip


def test_strangers_are_refused_everywhere_and_members_are_served(owner: Owner) -> None:
    a = SwarmClient(net(owner.member("node-a")))
    clients, dhts, averagers = [a], [], []
    try:
        b = SwarmClient(net(owner.member("node-b"), a.visible_maddrs()))
        clients.append(b)
        assert stored_and_seen(b.dht, a.dht, "test_probe") and stored_and_seen(a.dht, b.dht, "test_probe")

        # a stranger cannot join the DHT (nobody answers its pings), nor can a peer of another owner
        with pytest.raises(NetworkError, match="none of the initial_peers responded"):
            clients.append(SwarmClient(net(None, a.visible_maddrs())))
        foreign = Owner(owner.dir.parent / "foreign-owner", owner.log)
        assert swarm_main(["init", "--swarm", SWARM, "--owner-dir", str(foreign.dir)]) == ExitCode.OK
        with pytest.raises(NetworkError, match="none of the initial_peers responded"):
            clients.append(SwarmClient(net(foreign.member("foreign"), a.visible_maddrs())))
        # ... and one that ignores the failed bootstrap can neither store on members nor read from them
        stranger = hivemind.DHT(
            initial_peers=a.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
            ensure_bootstrap_success=False,
        )  # fmt: skip
        dhts.append(stranger)
        for _ in range(3):
            assert not stored_and_seen(stranger, a.dht, "test_probe")
        assert stranger.get(swarm_key(SWARM, MemberInfo.KIND), latest=True) is None  # members announce there

        # averaging: members form a round and download each other's state; a stranger is refused
        averagers.extend([averager(a, 1.0), averager(b, 3.0)])
        step_b = averagers[1].step(wait=False, timeout=60)
        assert averagers[0].step(timeout=60) is not None and step_b.result(timeout=60) is not None
        with averagers[0].get_tensors() as tensors:
            assert torch.allclose(tensors[0], torch.full((8,), 2.0))
        loaded = averagers[1].load_state_from_peers(timeout=30)
        assert loaded is not None and torch.allclose(loaded[1][0], torch.full((8,), 2.0))
        refused = ([averaging_pb2.PROTOCOL_VIOLATION], "closed")
        for _ in range(2):  # every attempt, not only the first
            stranger_id, joined, downloaded, aggregated = stranger_calls(a.visible_maddrs(), a.peer_id)
            assert joined in refused and aggregated in refused, (joined, aggregated)
            assert downloaded == 0
            log = owner.log.read_text()  # the member refused this very peer, each time, whatever we saw of it
            for action in ("request to join an averaging round", "part for all-reduce", "state download"):
                assert f"refused a {action} from peer {stranger_id}" in log, (action, stranger_id)

        # nobody crashed, the members still work together, and every refusal was logged
        assert all(c.dht.is_alive() for c in clients) and all(x.is_alive() for x in averagers)
        assert stored_and_seen(b.dht, a.dht, "test_probe")
        log = owner.log.read_text()
        assert "refused a DHT request: no credential" in log
        assert "refused a state download from peer" in log and "request to join an averaging round" in log
    finally:
        for x in averagers:
            x.shutdown()
        for d in dhts:
            d.shutdown()
        for c in clients:
            c.shutdown()


def test_revoked_and_expired_members_are_refused_within_one_ttl(owner: Owner) -> None:
    publisher = owner.member("coordinator").model_copy(update={"revocations": owner.revocations})
    a = SwarmClient(net(publisher))
    clients, averagers = [a], []
    try:
        revoked = owner.member("node-revoked")
        c = SwarmClient(net(revoked, a.visible_maddrs()))
        d = SwarmClient(net(owner.member("node-expiring", expires_in="20s"), a.visible_maddrs()))
        clients += [c, d]
        averagers.append(averager(a, 1.0))
        assert stored_and_seen(c.dht, a.dht, "test_probe_c") and stored_and_seen(d.dht, a.dht, "test_probe_d")
        averagers.append(averager(c, 0.0))
        assert averagers[1].load_state_from_peers(timeout=30) is not None
        assert download_parts(c, a.peer_id) > 0

        assert swarm_main(["revoke", str(owner.serial(revoked)), "--owner-dir", str(owner.dir)]) == 0
        started = time.monotonic()
        wait_for(lambda: not stored_and_seen(c.dht, a.dht, "test_probe_c"), 3 * TTL_S, "the revocation")
        # members re-read the list every third of the TTL; the bound leaves room for a loaded machine
        assert time.monotonic() - started < 2 * TTL_S
        for _ in range(3):  # and it stays refused, for records and for state downloads
            assert not stored_and_seen(c.dht, a.dht, "test_probe_c")
        wait_for(lambda: download_parts(c, a.peer_id) == 0, TTL_S, "the averager's refusal")  # asked directly
        assert averagers[1].load_state_from_peers(timeout=10) is None  # as hivemind asks
        assert "refused a state download from peer" in owner.log.read_text()
        assert "refused a DHT request: credential" in owner.log.read_text()

        assert d.access is not None
        expires_at = d.access.credential.expires_at
        assert time.time() < expires_at and stored_and_seen(d.dht, a.dht, "test_probe_d")
        wait_for(lambda: time.time() > expires_at + 1, 60, "the credential's expiry", interval_s=0.5)
        assert not stored_and_seen(d.dht, a.dht, "test_probe_d")
        assert "(node-expiring) expired" in owner.log.read_text()
        assert all(x.dht.is_alive() for x in clients) and averagers[0].is_alive()
    finally:
        for x in averagers:
            x.shutdown()
        for client in clients:
            client.shutdown()
