"""A coordinator and nodes as real processes on 127.0.0.1: the live view, clean stops, bad records."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import hivemind
import pytest
from conftest import Peers
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from cogen.core.checkpoint import latest_checkpoint, read_metadata
from cogen.core.config import NetworkConfig
from cogen.core.exit_codes import ExitCode
from cogen.core.procs import tail, wait_for
from cogen.core.swarm import SwarmClient
from cogen.protocols import NodeInfo, ShardClaim, SwarmInfo, TrainingProgress, swarm_key

pytestmark = pytest.mark.slow


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _peers_by_expert(snapshot: dict) -> dict[str, dict]:
    return {p["expert"]: p for p in snapshot["peers"]}


def _trained(snapshot: dict, experts: set[str], min_step: int = 2) -> bool:
    found = _peers_by_expert(snapshot)
    return all(e in found and found[e]["online"] and found[e]["step"] >= min_step for e in experts)


def _snapshot_if_trained(peers: Peers, experts: set[str]) -> dict | None:
    snapshot = peers.api()
    return snapshot if _trained(snapshot, experts) else None


def test_two_nodes_appear_with_progress_and_stop_cleanly(peers: Peers) -> None:
    peers.start_coordinator()
    peers.start_node("node-medical", "medical", "--metrics-port", "0")
    peers.start_node("node-legal", "legal")
    snap = wait_for(
        lambda: _snapshot_if_trained(peers, {"medical", "legal"}),
        120,
        "both nodes training in /api/swarm",
        interval_s=0.5,
        alive=list(peers.procs.values()),
    )
    by_expert = _peers_by_expert(snap)
    for peer in by_expert.values():
        assert peer["state"] == "training", peer
        assert peer["tokens"] == peer["samples"] * 32, peer  # block size 32
        assert peer["loss"] is not None and peer["loss"] > 0
        assert peer["device"] == "cpu" and peer["precision"] == "int8"
        assert peer["samples_per_second"] > 0
    assert by_expert["medical"]["peer_id"] != by_expert["legal"]["peer_id"]
    assert {e["expert"] for e in snap["experts"]} == {"medical", "legal"}
    assert snap["peers_online"] == 2

    # the medical node serves its own /metrics; the coordinator scrapes it and re-exposes it per peer
    medical_id = by_expert["medical"]["id"]

    def scraped() -> str | None:
        text = _get_text(peers.coordinator_info["api_url"] + "/metrics")
        return text if f'peer="{medical_id}"' in text and "cogen_node_steps_total" in text else None

    text = wait_for(scraped, 60, "node metrics in the coordinator's /metrics", interval_s=0.5)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "cogen_node_steps" in families or "cogen_node_steps_total" in families

    # SIGTERM: the node finishes its step, saves its adapter and exits 0 within seconds
    started = time.monotonic()
    peers.terminate("node-medical")
    assert peers.wait_exit("node-medical", 60) == 0, tail(peers.log("node-medical"))
    assert time.monotonic() - started < 30
    ckpt = latest_checkpoint(peers.workdir / "node-medical")
    assert ckpt is not None
    meta = read_metadata(ckpt, verify=True)  # every file's sha256 checks out
    assert meta.expert == "medical" and meta.steps >= 2 and meta.tokens == meta.samples * 32
    assert "received SIGTERM" in peers.log("node-medical").read_text()


def test_malformed_records_do_not_crash_anyone(peers: Peers) -> None:
    peers.start_coordinator()
    peers.start_node("node-code", "code")
    wait_for(
        lambda: _trained(peers.api(), {"code"}, 1),
        120,
        "node training",
        interval_s=0.5,
        alive=list(peers.procs.values()),
    )

    # a peer without cogen's validators writes garbage under the swarm's keys
    rogue = hivemind.DHT(initial_peers=peers.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    # and a peer with validators tries to publish a record under another owner's key
    forger = SwarmClient(
        NetworkConfig(swarm=peers.swarm, host="127.0.0.1", initial_peers=tuple(peers.initial_peers))
    )
    try:
        expiry = get_dht_time() + 30
        for schema in (NodeInfo, TrainingProgress, SwarmInfo, ShardClaim):
            key = swarm_key(peers.swarm, schema.KIND)
            rogue.store(key, {"protocol_version": 1, "peer_id": 42}, expiry, subkey=b"no-owner")
            rogue.store(key, b"\xff\x00not msgpack", expiry, subkey=b"[owner:ssh-rsa AAAA]")
            rogue.store(key, [1, 2, 3], expiry)
        victim_owner = SwarmClient(NetworkConfig(swarm="other", host="127.0.0.1")).owner
        forger.dht.store(
            swarm_key(peers.swarm, NodeInfo.KIND), {"protocol_version": 1}, expiry, subkey=victim_owner
        )
        # everyone keeps running and the view holds only the real node
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            snap = peers.api()
            assert [p["expert"] for p in snap["peers"]] == ["code"], snap["peers"]
            for name, proc in peers.procs.items():
                assert proc.poll() is None, f"{name} died:\n{tail(peers.log(name))}"
            time.sleep(0.5)
        assert forger.fetch(NodeInfo) and all(e.record.expert == "code" for e in forger.fetch(NodeInfo))
    finally:
        rogue.shutdown()
        forger.shutdown()
    assert "rejected a" in peers.log("coordinator").read_text()


def test_node_refuses_a_swarm_on_another_protocol_version(peers: Peers, tmp_path: Path) -> None:
    host = SwarmClient(NetworkConfig(swarm=peers.swarm, host="127.0.0.1"))
    try:
        host.dht.store(
            swarm_key(peers.swarm, SwarmInfo.KIND),
            {"protocol_version": 999, "software_version": "9.9.9"},
            get_dht_time() + 60,
            subkey=host.owner,
        )
        peers.coordinator_info = {"initial_peers": host.visible_maddrs()}
        peers.start_node("node-new", "medical", expect_exit={ExitCode.PROTOCOL})
        assert peers.wait_exit("node-new", 60) == ExitCode.PROTOCOL
    finally:
        host.shutdown()
    log = peers.log("node-new").read_text()
    assert "speaks cogen protocol 999" in log and "9.9.9" in log


def test_bad_flags_fail_with_one_line(peers: Peers) -> None:
    peers.coordinator_info = {"initial_peers": ["/ip4/127.0.0.1/tcp/1/p2p/QmNotAPeer"]}
    peers.start_node("node-bad", "medical", "--lr", "-1", expect_exit={ExitCode.CONFIG})
    assert peers.wait_exit("node-bad", 60) == ExitCode.CONFIG
    lines = [line for line in peers.log("node-bad").read_text().splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "--lr" in lines[0], lines
