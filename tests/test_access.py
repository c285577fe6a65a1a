"""A permissioned swarm on 127.0.0.1: strangers, revoked and expired members are refused everywhere a
peer acts (DHT requests, averaging rounds, state downloads); members are served. Real hivemind DHTs
and averagers (their own processes), hivemind's real token-authorizer path, the real ``cogen swarm``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hivemind
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter
from pydantic import BaseModel

from cogen.app.swarm import main as swarm_main
from cogen.coordinator.api import PublishedFiles
from cogen.core.access import (
    Access,
    AccessError,
    credential_of,
    credential_refusal,
    issue_credential,
    load_private_key,
    read_model,
    sign_revocations,
    token_of,
)
from cogen.core.authorizer import SwarmAuthorizer
from cogen.core.averagers import GroupStateAverager
from cogen.core.config import AccessConfig, CoordinatorConfig, NetworkConfig, NodeConfig
from cogen.core.exit_codes import ExitCode
from cogen.core.http_access import CREDENTIAL_HEADER, credential_headers, register, request_for, unregister
from cogen.core.procs import wait_for
from cogen.core.settings import add_config_arguments, build_config
from cogen.core.swarm import NetworkError, SwarmClient
from cogen.node.follow import MirrorServer
from cogen.protocols import Credential, MemberInfo, swarm_key

pytestmark = pytest.mark.slow
SWARM = "test"
TTL_S = 6.0  # every third of it members refresh the revocation list and the member directory
PREFIX = "test_medical_g1_state"


@dataclass(frozen=True)
class Owner:
    dir: Path
    log: Path  # the authorizers' refusals, from every process

    @property
    def pub(self) -> Path:
        return self.dir / "owner.pub"

    @property
    def revocations(self) -> Path:
        return self.dir / "revocations.json"

    def member(self, name: str, expires_in: str = "1h") -> AccessConfig:
        key = self.dir.parent / f"{name}.key"
        assert swarm_main(["key", str(key)]) == ExitCode.OK
        out = self.dir.parent / f"{name}.credential.json"
        argv = ["issue", "--owner-dir", str(self.dir), "--member-key", f"{key}.pub", "--name", name]
        assert swarm_main([*argv, "--expires-in", expires_in, "--out", str(out)]) == ExitCode.OK
        return AccessConfig(owner_key=self.pub, credential=out, credential_key=key)

    def serial(self, access: AccessConfig) -> int:
        assert access.credential is not None
        return read_model(access.credential, Credential, "credential").serial


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    root = tmp_path_factory.mktemp("access")
    assert swarm_main(["init", "--swarm", SWARM, "--owner-dir", str(root / "owner")]) == ExitCode.OK
    handler = logging.FileHandler(root / "refusals.log")  # forked DHT and averager processes inherit it
    authorizer_log = logging.getLogger("cogen.core.authorizer")
    authorizer_log.addHandler(handler)
    yield Owner(root / "owner", root / "refusals.log")
    authorizer_log.removeHandler(handler)


def net(access: AccessConfig | None = None, initial: list[str] | None = None) -> NetworkConfig:
    return NetworkConfig(
        swarm=SWARM, host="127.0.0.1", initial_peers=tuple(initial or ()), record_ttl_s=TTL_S,
        access=access or AccessConfig(),
    )  # fmt: skip


def stored_and_seen(writer: hivemind.DHT, reader: hivemind.DHT, key: str) -> bool:
    """Whether a fresh value ``writer`` stores now reaches ``reader`` (stored on it or served to it)."""
    value = time.monotonic_ns()
    writer.store(key, value, get_dht_time() + 60)
    found = reader.get(key, latest=True)
    return found is not None and found.value == value


async def _direct_calls(p2p: P2P, peer: str) -> tuple[list[int], int, list[int]]:
    """Call a member's averager RPCs directly over libp2p: join a round, download its state, send an
    all-reduce part. Returns the join's codes, how many state parts came back, the part's codes."""
    stub = GroupStateAverager.get_stub(p2p, PeerID.from_base58(peer), namespace=PREFIX)
    join = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 30, group_key=PREFIX)
    joined = [m.code async for m in aiter_with_timeout(await stub.rpc_join_group(join), 30)]
    download = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
    downloaded = [m async for m in aiter_with_timeout(download, 30)]
    part = averaging_pb2.AveragingData(group_id=b"g", peer_id=p2p.peer_id.to_bytes(), weight=1.0)
    aggregated = [m.code async for m in aiter_with_timeout(await stub.rpc_aggregate_part(as_aiter(part)), 30)]
    return joined, len(downloaded), aggregated


def stranger_calls(maddrs: list[str], peer: str) -> tuple[list[int], int, list[int]]:
    """:func:`_direct_calls` from a fresh libp2p peer with no credential."""

    async def run() -> tuple[list[int], int, list[int]]:
        p2p = await P2P.create(initial_peers=maddrs)
        try:
            return await _direct_calls(p2p, peer)
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


def test_credentials_are_checked_under_the_owner_key(owner: Owner) -> None:
    access = owner.member("checked")
    a = Access.load(access, SWARM)
    assert a is not None
    key, now = load_private_key(owner.dir / "owner.key"), time.time()
    good = issue_credential(key, SWARM, 99, "x", a.credential.member_key, int(now) + 60)
    assert credential_refusal(good, a.owner_key, SWARM, frozenset(), now) is None
    assert credential_of(token_of(good)) == good  # the AccessToken hivemind sends carries it whole
    forged = good.model_copy(update={"name": "y"})
    assert "not signed" in str(credential_refusal(forged, a.owner_key, SWARM, frozenset(), now))
    other = issue_credential(a.member_key, SWARM, 99, "x", a.credential.member_key, int(now) + 60)
    assert "not signed" in str(credential_refusal(other, a.owner_key, SWARM, frozenset(), now))
    assert "swarm" in str(credential_refusal(good, a.owner_key, "other", frozenset(), now))
    assert "expired" in str(credential_refusal(good, a.owner_key, SWARM, frozenset(), now + 61))
    assert "revoked" in str(credential_refusal(good, a.owner_key, SWARM, frozenset({99}), now))
    assert credential_refusal(None, a.owner_key, SWARM, frozenset(), now) == "no credential"
    assert credential_of(token_of(good).__class__(username="a b", public_key=b"\xff")) is None


def test_bad_key_and_credential_files_are_one_line_errors(
    owner: Owner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = owner.member("files")
    assert access.credential_key is not None and access.credential is not None
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    capsys.readouterr()
    assert swarm_main(["list", "--owner-dir", str(owner.dir)]) == ExitCode.OK
    listed = {line.split()[1]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed["files"] == "valid"
    issue = ["issue", "--owner-dir", str(owner.dir), "--name", "x", "--expires-in", "1h"]
    assert swarm_main([*issue, "--member-key", str(access.credential_key)]) == ExitCode.CONFIG
    assert swarm_main(["list", "--owner-dir", str(tmp_path)]) == ExitCode.CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("cogen swarm: access error: " in line for line in lines), lines
    assert "not an OpenSSH RSA public key" in lines[0] and "not an owner directory" in lines[1]
    cases = {
        "credential": dict(credential=garbage),
        "private key": dict(credential_key=garbage),
        "public key": dict(owner_key=garbage),
        "another key": dict(credential_key=owner.dir.parent / "checked.key"),  # not the credential's key
        "need --owner-key": dict(owner_key=None),
    }
    for expected, change in cases.items():
        with pytest.raises(AccessError, match=expected) as err:
            Access.load(access.model_copy(update=change), SWARM)
        assert err.value.exit_code == ExitCode.CONFIG and "\n" not in str(err.value)
    with pytest.raises(AccessError, match="not a credential"):  # before any DHT starts
        SwarmClient(net(access.model_copy(update={"credential": garbage})))


@pytest.mark.parametrize("config", [NodeConfig, CoordinatorConfig])
def test_nodes_and_the_coordinator_take_the_access_flags(config: type[BaseModel], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config)
    flags = ["--owner-key", "o.pub", "--credential", "c.json", "--credential-key", "k.key"]
    args = parser.parse_args([*flags, "--revocations", "r.json", "--checkpoint-auth"])
    access = build_config(config, args, environ={}).network.access  # type: ignore[attr-defined]
    assert access == AccessConfig(
        owner_key=Path("o.pub"), credential=Path("c.json"), credential_key=Path("k.key"),
        revocations=Path("r.json"), checkpoint_auth=True,
    )  # fmt: skip
    assert build_config(config, parser.parse_args([]), environ={}).network.access == AccessConfig()  # type: ignore[attr-defined]


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
        for _ in range(2):  # every attempt, not only the first
            joined, downloaded, aggregated = stranger_calls(a.visible_maddrs(), a.peer_id)
            assert joined == [averaging_pb2.PROTOCOL_VIOLATION], joined
            assert aggregated == [averaging_pb2.PROTOCOL_VIOLATION], aggregated
            assert downloaded == 0

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


def test_checkpoint_downloads_need_a_members_signed_header(owner: Owner, tmp_path: Path) -> None:
    """``--checkpoint-auth``: the node's base mirror and the coordinator's ``/checkpoints/`` answer 403
    unless the request carries a valid member's credential and a fresh proof of its key."""
    member = Access.load(owner.member("fetcher").model_copy(update={"checkpoint_auth": True}), SWARM)
    assert member is not None
    authorizer = SwarmAuthorizer(member, TTL_S)
    (tmp_path / "gen-000001").mkdir()
    (tmp_path / "gen-000001" / "manifest.json").write_text("{}")
    app = FastAPI()
    app.mount("/checkpoints", PublishedFiles(tmp_path, lambda: {"gen-000001"}), name="checkpoints")
    mirror = MirrorServer(tmp_path, "127.0.0.1")
    mirror.start()
    register(member, authorizer)
    try:
        api = TestClient(app)
        mirror_url = f"{mirror.url}gen-000001/manifest.json"

        def status(headers: dict[str, str] | None, where: str = "mirror") -> int:
            if where == "api":
                return api.get("/checkpoints/gen-000001/manifest.json", headers=headers or {}).status_code
            try:
                with urllib.request.urlopen(urllib.request.Request(mirror_url, headers=headers or {})) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code

        signed = dict(request_for(mirror_url).header_items())
        path = "/checkpoints/gen-000001/manifest.json"
        assert status(signed) == 200 and status(credential_headers(member, path), "api") == 200
        assert status(None) == 403 and status(None, "api") == 403  # a stranger
        other = Access.load(owner.member("other"), SWARM)
        assert other is not None
        forged = {
            **credential_headers(other, "/gen-000001/manifest.json"),
            CREDENTIAL_HEADER: signed[CREDENTIAL_HEADER.capitalize()],
        }
        assert status(forged) == 403  # a member's credential without its key
        stale = credential_headers(member, "/gen-000001/manifest.json", now=time.time() - 600)
        assert status(stale) == 403
        assert (
            status(credential_headers(member, "/gen-000002/manifest.json")) == 403
        )  # signed for another path
        key = load_private_key(owner.dir / "owner.key")
        authorizer.apply_revocations(
            sign_revocations(key, SWARM, {member.credential.serial}, int(time.time()))
        )
        assert status(dict(request_for(mirror_url).header_items())) == 403  # revoked
        assert status(credential_headers(member, path), "api") == 403
        assert "checkpoint download: credential" in owner.log.read_text()
    finally:
        unregister(member)
        mirror.stop()
    assert request_for(mirror_url).header_items() == []  # an open swarm's requests carry nothing
