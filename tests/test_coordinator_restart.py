"""A coordinator that survives restarts: a stable peer id, generations read back from disk, nothing
half-written ever served, failed merges retried with backoff.

The end-to-end test SIGKILLs a real coordinator while it merges a generation and starts it again on the
same out dir: same peer id and multiaddr, the generation is merged again under the same number, and
the nodes that train meanwhile follow it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Peers, get_json
from merging_helpers import make_expert, merge_config
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from cogen.coordinator.api import PublishedFiles
from cogen.coordinator.merging import merge_experts
from cogen.coordinator.merging.publish import (
    GENERATIONS,
    LATEST,
    REJECTED,
    published_generations,
    remove_stale_temps,
)
from cogen.core.backoff import Backoff
from cogen.core.config import NetworkConfig
from cogen.core.procs import ChildFailed, kill_group, read_json, tail, wait_for
from cogen.core.swarm import NetworkError, SwarmClient, ensure_p2p_identity
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, read_manifest, verify_manifest

NODE_ARGS = ["--inner-steps", "3", "--matchmaking-s", "1.5", "--averaging-timeout-s", "30", "--lr", "2e-2"]
MOVED = re.compile(r"now training on generation (\d+)")


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(base_s=5.0, cap_s=60.0)
    assert backoff.delay() == 0.0
    assert [backoff.failed() for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    for _ in range(2000):  # no overflow however long it keeps failing
        backoff.failed()
    assert backoff.delay() == 60.0
    backoff.succeeded()
    assert backoff.failed() == 5.0
    with pytest.raises(ValueError, match="0 < base_s <= cap_s"):
        Backoff(base_s=10.0, cap_s=1.0)


def test_p2p_identity_is_private_and_keeps_the_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "state" / "p2p-identity.key"
    cfg = NetworkConfig(swarm="idtest", host="127.0.0.1")
    ids = []
    for _ in range(2):
        client = SwarmClient(cfg, identity_path=path)
        ids.append(client.peer_id)
        client.shutdown()
    assert ids[0] == ids[1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left next to it
    path.chmod(0o644)
    with pytest.raises(NetworkError, match=r"readable by others .*chmod 600"):
        ensure_p2p_identity(path)


@pytest.fixture(scope="module")
def two_generations(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """OUT with two real published generations (gen 2 on gen 1), and the key that signed them."""
    root = tmp_path_factory.mktemp("restore")
    experts = (make_expert(tiny_path, root / "a", 1), make_expert(tiny_path, root / "b", 2, expert="code"))
    common = dict(experts=experts, method="linear", out=root / "out", identity=root / "id.pem", device="cpu")
    first = merge_experts(merge_config(**common))
    merge_experts(merge_config(**common, model=str(first)))
    return root / "out", root / "id.pem"


def test_restore_keeps_what_verifies_and_drops_what_a_killed_publish_left(
    two_generations: tuple[Path, Path], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(two_generations[0], tmp_path / "out", symlinks=True))
    key = verify_manifest(out / GENERATIONS / "gen-000001").public_key
    # what a publish killed half-way leaves: its temp dir with a partial file, and a temp latest link
    partial = out / GENERATIONS / ".gen-000003-k1ll3d"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    os.symlink(GENERATIONS + "/.gen-000003-k1ll3d", out / ".latest-4242")
    assert sorted(p.name for p in remove_stale_temps(out)) == [".gen-000003-k1ll3d", ".latest-4242"]
    assert not partial.exists() and not (out / ".latest-4242").is_symlink()

    found = published_generations(out, key)
    assert [m.generation for m, _, _ in found] == [1, 2]
    assert found[1][1] == sha256_file(out / GENERATIONS / "gen-000002" / MANIFEST_FILE)

    # a tampered generation is moved aside (kept for a person), never served, and latest steps back
    with open(out / GENERATIONS / "gen-000002" / "config.json", "a") as handle:
        handle.write(" ")
    found = published_generations(out, key)
    assert [m.generation for m, _, _ in found] == [1]
    assert not (out / GENERATIONS / "gen-000002").exists()
    (rejected,) = (out / REJECTED).iterdir()
    assert rejected.name.startswith("gen-000002-") and read_manifest(rejected).generation == 2
    assert (out / LATEST).resolve() == (out / GENERATIONS / "gen-000001").resolve()
    # signed by another key: refused as well
    assert published_generations(out, "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC0 other") == []
    assert not (out / LATEST).is_symlink()


def test_only_published_generations_are_served(two_generations: tuple[Path, Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(two_generations[0] / GENERATIONS, tmp_path / "generations"))
    (root / ".gen-000003-abc").mkdir()
    (root / ".gen-000003-abc" / MANIFEST_FILE).write_text("{}")
    served = {"gen-000001"}
    api = TestClient(Starlette(routes=[Mount("/checkpoints", PublishedFiles(root, lambda: served))]))
    manifest = api.get("/checkpoints/gen-000001/manifest.json")
    assert manifest.status_code == 200 and manifest.json()["generation"] == 1
    assert api.get("/checkpoints/gen-000002/manifest.json").status_code == 404  # on disk, not served yet
    assert api.get("/checkpoints/.gen-000003-abc/manifest.json").status_code == 404  # a temp dir
    assert api.get("/checkpoints/gen-000001/../gen-000002/manifest.json").status_code == 404
    served.add("gen-000002")
    assert api.get("/checkpoints/gen-000002/manifest.json").status_code == 200


def _wait(peers: Peers, condition: Callable[[], bool], timeout_s: float, what: str, names: list[str]) -> None:
    """``wait_for`` on live ``names``; a failure shows the tail of every log of the test."""
    try:
        wait_for(condition, timeout_s, what, interval_s=0.05, alive=[peers.procs[n] for n in names])
    except ChildFailed as e:
        logs = "\n".join(f"--- {n}:\n{tail(peers.log(n), 25)}" for n in peers.procs)
        raise AssertionError(f"{e}\n{logs}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_coordinator_killed_mid_merge_comes_back_with_its_peer_id_and_merges_again(
    peers: Peers, tmp_path: Path
) -> None:
    out = tmp_path / "coordinator"
    dht_port, api_port = _free_port(), _free_port()

    def start(name: str) -> dict[str, object]:
        ready = tmp_path / f"{name}.json"
        proc = peers.start(name, "cogen.coordinator.cli", [
            "--swarm", peers.swarm, "--host", "127.0.0.1", "--port", str(dht_port),
            "--api-port", str(api_port), "--ready-file", str(ready), "--poll-interval-s", "0.5",
            "--record-ttl-s", "10", "--model", "tiny", "--generation-outer-steps", "2",
            "--max-generations", "2", "--out-dir", str(out), "--eval-blocks", "4", "--eval-block-size", "32",
            "--merge-method", "ties", "--collect-timeout-s", "30",
        ])  # fmt: skip
        info: dict[str, object] = wait_for(lambda: read_json(ready), 60, f"{name} ready", alive=[proc])
        peers.coordinator_info = info
        return info

    first = start("coordinator")
    nodes = {"med": "medical", "law": "legal"}  # two domains: each expert beats the base on its own
    for name, expert in nodes.items():
        peers.start_node(name, expert, *NODE_ARGS)
    log = peers.log("coordinator")
    live = ["coordinator", *nodes]
    _wait(peers, lambda: "generation 1 published" in log.read_text(), 240, "generation 1 published", live)
    # generation 2 ends: kill the coordinator as soon as it says it merges (before it can publish)
    _wait(
        peers, lambda: "generation 1 ends: collecting" in log.read_text(), 240, "generation 2 collected", live
    )
    _wait(peers, lambda: log.read_text().count("merging 2 experts") >= 2, 120, "generation 2 merging", live)
    known = read_json(out / "known-peers.json")  # whom the coordinator dials again after a restart
    kill_group(peers.procs["coordinator"])
    assert peers.procs["coordinator"].wait(30) < 0
    generations = out / GENERATIONS
    assert sorted(p.name for p in generations.iterdir() if not p.name.startswith(".")) == ["gen-000001"], (
        "the kill came after generation 2 was published; the merge was too fast to interrupt"
    )
    # what a kill inside publish leaves (the test cannot time that window; publish's own temp naming)
    (generations / ".gen-000002-k1ll3d").mkdir()
    (generations / ".gen-000002-k1ll3d" / "model.safetensors").write_bytes(b"\0" * 1000)

    assert len(known["peers"]) >= 2, known
    second = start("coordinator-2")
    assert second["peer_id"] == first["peer_id"] and second["initial_peers"] == first["initial_peers"]
    assert stat.S_IMODE((out / "p2p-identity.key").stat().st_mode) == 0o600
    assert not (generations / ".gen-000002-k1ll3d").exists()
    api = str(second["api_url"])
    assert [g["generation"] for g in get_json(api + "/api/generations")][:1] == [1]  # read back from disk

    # the nodes, which kept training on generation 1, follow the generation merged again as number 2
    def on_two() -> bool:
        return all(MOVED.findall(peers.log(n).read_text())[-1:] == ["2"] for n in nodes)

    _wait(peers, on_two, 240, "the nodes on generation 2", [*nodes, "coordinator-2"])
    assert [g["generation"] for g in get_json(api + "/api/generations")] == [1, 2]
    m1, m2 = (verify_manifest(generations / f"gen-{g:06d}") for g in (1, 2))
    assert m2.parent.manifest_sha256 == sha256_file(generations / "gen-000001" / MANIFEST_FILE)
    assert m1.public_key == m2.public_key
    assert sorted(p.name for p in generations.iterdir()) == ["gen-000001", "gen-000002"]
    assert "resuming from" in peers.log("coordinator-2").read_text()
