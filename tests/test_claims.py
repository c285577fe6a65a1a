"""A hostile node's forged prequential claims, in a real swarm: caught, left out, flagged.

A coordinator and two tiny-model nodes on 127.0.0.1: an honest ``medical`` node and a ``legal`` node
that runs cogen-node unchanged except that the claims it signs are forged (``lying_node.py``: every
window loss × 0.3, so the cheap ranking would put it first). The coordinator gathers both claims,
spot-checks them on the experts it collected over hivemind, and must publish a generation that ranks
the liar last, gives it weight 0 (the merge is the honest expert's), says why in the signed manifest
and raises a ``claims_failed`` alert.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY_NODE_ARGS, Peers

from cogen.core.procs import wait_for
from cogen.protocols.manifest import MANIFEST_FILE, verify_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

NODE_ARGS = ["--inner-steps", "3", "--matchmaking-s", "1.5", "--averaging-timeout-s", "30", "--lr", "2e-2"]
TESTS = Path(__file__).parent


def test_a_node_that_forges_its_losses_is_caught_and_left_out(
    peers: Peers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("COGEN_TEST_LIE", "0.3")
    out = tmp_path / "coordinator"
    peers.start_coordinator(
        "--model", "tiny", "--generation-outer-steps", "4", "--max-generations", "1", "--out-dir", str(out),
        "--eval-blocks", "4", "--eval-block-size", "32", "--collect-timeout-s", "30",
    )  # fmt: skip
    peers.start_node("honest", "medical", *NODE_ARGS)
    peers.start("liar", "lying_node", [
        "--swarm", peers.swarm, "--host", "127.0.0.1", "--initial-peers", *peers.initial_peers,
        "--expert", "legal", "--output-dir", str(peers.workdir / "liar"), *TINY_NODE_ARGS, *NODE_ARGS,
    ])  # fmt: skip
    alive = list(peers.procs.values())
    first = out / "generations" / "gen-000001"
    wait_for(lambda: (first / MANIFEST_FILE).is_file(), 300, "generation 1 published", interval_s=1.0,
             alive=alive)  # fmt: skip

    manifest = verify_manifest(first)
    assert manifest.prequential is not None
    entries = {e.expert: e for e in manifest.prequential.experts}
    liar, honest = entries["legal"], entries["medical"]
    assert liar.flagged is not None and "claimed a loss of" in liar.flagged, liar
    assert liar.checked >= 1 and liar.rank == 2 and honest.rank == 1 and honest.flagged is None, entries
    weights = {e.expert: e.weight for e in manifest.experts}
    assert weights["legal"] == 0 and weights["medical"] > 0, weights
    alerts = wait_for(
        lambda: [a for a in peers.api("/api/alerts")["alerts"] if a["kind"] == "claims_failed"] or None, 60,
        "a claims_failed alert",
    )  # fmt: skip
    assert [a["subject"] for a in alerts] == ["legal"]
    # the honest node's claims were checked too, and held
    assert honest.checked >= 1 and honest.score is not None, honest
