"""A whole generation across real hosts: five network namespaces on 100 Mbit/s links.

Host 0 runs the coordinator (DHT and API on 0.0.0.0, announced as its own address); hosts 1 and 2 a
group of two on ``medical``; host 3 a node alone on ``legal`` that cannot reach the coordinator's
HTTP port (so it must fetch the new base from another node's mirror); host 4 a third ``medical``
member behind NAT (every inbound connection dropped), joined as a client-mode peer. The nodes join,
average across hosts, the coordinator collects, merges and publishes generation 1, and every node
fetches it, verifies it and trains on it (each host keeps its bases on its own disk, as separate
machines would). No announced address is a wildcard or a loopback one. The medical group averages
with ``mean`` (hivemind's butterfly all-reduce, the default) and again with ``centered_clip``, whose
members hand each other their whole deltas over the round exchange: across hosts and through the NAT,
before and after the generation switch.

The publishing gate is off: this test is about the network, and the gate's verdict on two 32-token
blocks of a randomly initialised model is noise that can keep the parent for the whole deadline (the
gate has its own tests, ``tests/test_gating.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_NODE_ARGS, Peers, host_network

from cogen.core.addresses import maddr_host
from cogen.core.netns import Switch
from cogen.core.procs import read_json, wait_for
from cogen.protocols.manifest import verify_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

NODE_ARGS = [
    *TINY_NODE_ARGS, "--inner-steps", "3", "--matchmaking-s", "2", "--averaging-timeout-s", "30",
    "--lr", "2e-2", "--host", "0.0.0.0",
]  # fmt: skip
MOVED = re.compile(r"now training on generation (\d+)")
FETCHED = re.compile(r"fetched and verified generation 1 from (\S+)")
APPLIED = re.compile(r"outer step \d+ applied \| group of (\d+)")


@pytest.fixture
def net() -> Iterator[Switch]:
    with host_network(5) as switch:
        yield switch


def _log(peers: Peers, name: str) -> str:
    return peers.log(name).read_text(errors="replace")


@pytest.mark.parametrize("aggregator", ["mean", "centered_clip"])
def test_a_generation_across_hosts_with_a_mirror_and_a_volunteer_behind_nat(
    net: Switch, peers: Peers, tmp_path: Path, aggregator: str
) -> None:
    coordinator_host = net.addresses[0]
    ready = tmp_path / "coordinator.json"
    coordinator = peers.start("coordinator", "cogen.coordinator.cli", [
        "--swarm", peers.swarm, "--host", "0.0.0.0", "--port", "0", "--announce-host", coordinator_host,
        "--api-host", "0.0.0.0", "--api-port", "8765", "--ready-file", str(ready), "--poll-interval-s", "0.5",
        "--record-ttl-s", "10", "--model", "tiny", "--generation-outer-steps", "4", "--max-generations", "1",
        "--out-dir", str(tmp_path / "out"), "--eval-blocks", "2", "--eval-block-size", "32",
        "--router-blocks", "2", "--collect-timeout-s", "40", "--no-gate",
    ], prefix=net.exec_prefix(0))  # fmt: skip
    info = wait_for(lambda: read_json(ready), 90, "coordinator ready", alive=[coordinator])
    assert info["public_api_url"] == f"http://{coordinator_host}:8765"
    initial = [m for m in info["initial_peers"] if maddr_host(m) == coordinator_host]
    assert initial, info["initial_peers"]  # the announced multiaddr, not a wildcard

    net.block_tcp(3, coordinator_host, 8765)  # the solo node cannot fetch from the coordinator
    net.block_inbound(4)  # a volunteer behind NAT
    api = f"http://{coordinator_host}:8765/api/swarm"
    assert net.reachable(1, api, timeout_s=10) and not net.reachable(3, api), "host 3 must not reach the API"
    group = ["--aggregator", aggregator]
    nodes = {"med-a": (1, "medical", group), "med-b": (2, "medical", group), "law": (3, "legal", []),
             "med-nat": (4, "medical", ["--client-mode", *group])}  # fmt: skip
    for name, (host, expert, extra) in nodes.items():
        peers.start(name, "cogen.node.cli", [
            "--swarm", peers.swarm, "--initial-peers", *initial, "--expert", expert,
            "--output-dir", str(tmp_path / name), "--bases-dir", str(tmp_path / name / "bases"), *NODE_ARGS,
            *extra,
        ], prefix=net.exec_prefix(host))  # fmt: skip
    alive = list(peers.procs.values())
    wait_for(lambda: all(MOVED.search(_log(peers, n)) for n in nodes), 420,
             "every node training on generation 1", interval_s=2.0, alive=alive)  # fmt: skip

    manifest = verify_manifest(tmp_path / "out" / "generations" / "gen-000001")
    assert {e.expert for e in manifest.experts} == {"medical", "legal"}
    sources = {name: FETCHED.search(_log(peers, name)) for name in nodes}
    assert all(sources.values()), sources
    urls = {name: m.group(1) for name, m in sources.items() if m}
    # the solo node got generation 1 from a groupmate's mirror on host 1 or 2, the others from wherever
    assert re.match(rf"http://({net.addresses[1]}|{net.addresses[2]}):\d+/", urls["law"]), urls
    for name, url in urls.items():
        assert "0.0.0.0" not in url and "127.0.0.1" not in url, (name, url)
    for name in nodes:
        assert "refusing generation" not in _log(peers, name) or name == "law", _log(peers, name)[-2000:]
    # the medical members averaged across hosts, the NAT'd one included
    for name in ("med-a", "med-b", "med-nat"):
        sizes = [int(s) for s in APPLIED.findall(_log(peers, name))]
        assert sizes and max(sizes) >= 2, (name, sizes)
    # every node, the NAT'd one included, is online in the coordinator's view; a node's record can lapse
    # for a moment while it switches bases, so this waits on the condition rather than one reading
    wait_for(lambda: net.get_json(0, info["api_url"] + "/api/swarm")["peers_online"] >= 4, 60,
             "the coordinator sees all four nodes online", interval_s=1.0, alive=alive)  # fmt: skip

    for name in nodes:
        peers.terminate(name)
    for name in nodes:
        assert peers.wait_exit(name, 120) == 0
