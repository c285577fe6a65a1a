"""A permissioned swarm of real ``cogen-coordinator`` and ``cogen-node`` processes on 127.0.0.1:
members train and show up, a stranger cannot join, a bad credential file is exit code 2, and a
revoked member drops out of the coordinator's view within about one record TTL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import Peers

from cogen.app.swarm import main as swarm_main
from cogen.core.exit_codes import ExitCode
from cogen.core.procs import tail, wait_for

pytestmark = pytest.mark.slow
TTL_S = 10.0  # the record TTL the Peers helper gives every process


def member_flags(owner: Path, name: str) -> list[str]:
    key = owner.parent / "members" / f"{name}.key"
    key.parent.mkdir(exist_ok=True)
    assert swarm_main(["key", str(key)]) == ExitCode.OK
    credential = owner.parent / "members" / f"{name}.credential.json"
    issue = ["issue", "--owner-dir", str(owner), "--member-key", f"{key}.pub", "--name", name]
    assert swarm_main([*issue, "--expires-in", "1h", "--out", str(credential)]) == ExitCode.OK
    flags = ["--owner-key", str(owner / "owner.pub"), "--credential", str(credential)]
    return [*flags, "--credential-key", str(key)]


def online(peers: Peers) -> set[str]:
    return {p["expert"] + ":" + p["id"] for p in peers.api()["peers"] if p["online"] and p["step"] >= 1}


def test_members_train_strangers_cannot_join_and_the_revoked_drop_out(peers: Peers, tmp_path: Path) -> None:
    owner = tmp_path / "owner"
    assert swarm_main(["init", "--swarm", peers.swarm, "--owner-dir", str(owner)]) == ExitCode.OK
    coordinator = member_flags(owner, "coordinator")
    peers.start_coordinator(*coordinator, "--revocations", str(owner / "revocations.json"))
    peers.start_node("node-medical", "medical", *member_flags(owner, "node-medical"))
    peers.start_node("node-legal", "legal", *member_flags(owner, "node-legal"))
    trained = wait_for(
        lambda: {e.split(":")[0] for e in online(peers)} == {"medical", "legal"}, 180,
        "both members training in the coordinator's view", interval_s=0.5, alive=list(peers.procs.values()),
    )  # fmt: skip
    assert trained

    peers.start_node("node-stranger", "code", expect_exit={ExitCode.NETWORK})
    assert peers.wait_exit("node-stranger", 120) == ExitCode.NETWORK
    assert "none of the initial_peers responded" in tail(peers.log("node-stranger"))
    bad = [*member_flags(owner, "node-bad")[:2], "--credential", str(owner / "owner.pub")]
    bad += ["--credential-key", str(tmp_path / "members" / "node-bad.key")]
    peers.start_node("node-bad", "code", *bad, expect_exit={ExitCode.CONFIG})
    assert peers.wait_exit("node-bad", 120) == ExitCode.CONFIG
    last = tail(peers.log("node-bad"), 50).strip().splitlines()[-1]
    assert "cogen-node: access error: " in last and "is not a credential" in last, last

    legal = json.loads((tmp_path / "members" / "node-legal.credential.json").read_text())["serial"]
    assert swarm_main(["revoke", str(legal), "--owner-dir", str(owner)]) == ExitCode.OK
    started = time.monotonic()
    wait_for(
        lambda: {e.split(":")[0] for e in online(peers)} == {"medical"}, 6 * TTL_S,
        "the revoked member out of the coordinator's view", interval_s=0.5,
    )  # fmt: skip
    # its last accepted record lives one TTL; the revocation reaches the coordinator within a third of one
    assert time.monotonic() - started < 3 * TTL_S
    assert all(
        proc.poll() is None for name, proc in peers.procs.items() if name in ("coordinator", "node-medical")
    )
