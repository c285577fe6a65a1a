"""Two generations end to end: coordinator + nodes on 127.0.0.1 with the tiny model.

The coordinator ends a generation once every group made eight outer steps (24 inner steps: enough for
the experts to learn something measurable on a quiet machine), collects each expert from
its group over hivemind (no files uploaded), merges and publishes a signed base, and serves it; the
nodes fetch it, verify it and go on training on it without restarting — twice.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Peers
from transformers import AutoModelForCausalLM

from cogen.core.checkpoint import latest_checkpoint, read_metadata
from cogen.core.procs import wait_for
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, verify_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

NODE_ARGS = ["--inner-steps", "3", "--matchmaking-s", "1.5", "--averaging-timeout-s", "30", "--lr", "2e-2"]
MOVED = re.compile(r"now training on generation (\d+)")


def _generations(peers: Peers, name: str) -> list[int]:
    return [int(g) for g in MOVED.findall(peers.log(name).read_text())]


def test_two_generations_end_to_end(peers: Peers, tmp_path: Path) -> None:
    out = tmp_path / "coordinator"
    peers.start_coordinator(
        "--model", "tiny", "--generation-outer-steps", "8", "--max-generations", "2",
        "--out-dir", str(out), "--eval-blocks", "4", "--eval-block-size", "32", "--merge-method", "ties",
        "--collect-timeout-s", "30",
    )  # fmt: skip
    nodes = {"med": "medical", "law": "legal"}
    for name, expert in nodes.items():
        peers.start_node(name, expert, *NODE_ARGS)
    alive = list(peers.procs.values())
    wait_for(lambda: all(_generations(peers, n)[-1:] == [2] for n in nodes), 300,
             "both nodes training on generation 2", interval_s=1.0, alive=alive)  # fmt: skip

    generations = peers.api("/api/generations")
    assert [g["generation"] for g in generations] == [1, 2]
    key = peers.api("/api/swarm")  # the swarm view works while generations are published
    assert key["peers_online"] >= 2
    first, second = (out / "generations" / f"gen-{g:06d}" for g in (1, 2))
    m1, m2 = verify_manifest(first), verify_manifest(second)
    assert m1.public_key == m2.public_key
    assert m2.parent.manifest_sha256 == sha256_file(first / MANIFEST_FILE)  # lineage
    assert {e.expert for e in m1.experts} == {"medical", "legal"}
    assert m1.evaluation is not None and m1.evaluation.merged is not None
    # generation 1 is an audit (--full-eval-every 4): the full ranking, the cheap one from the nodes'
    # prequential claims, and their agreement; generation 2 ranks and weights its experts cheaply only
    assert m1.rankings is not None and m1.prequential is not None and m1.agreement is not None
    assert {e.expert for e in m1.prequential.experts} == {"medical", "legal"}
    assert all(e.flagged is None and e.batches > 0 for e in m1.prequential.experts), m1.prequential
    assert m1.agreement.full_cost_tokens == 4 * 2 * 4 * 32
    # every claim was spot-checked, one 32-token row each for the window and the base (the 2 % budget of
    # so small an evaluation is less than a row: a claim is never left unchecked)
    assert all(e.checked == 2 for e in m1.prequential.experts), m1.prequential
    assert m1.agreement.cheap_cost_tokens == m1.prequential.cost_tokens == 2 * 2 * 32
    assert m2.prequential is not None and m2.rankings is None and m2.weight_source == "prequential"
    assert m2.evaluation is not None and m2.evaluation.experts == {}  # no expert evaluated
    # generation after generation, the base gets better on the swarm's domains
    assert m2.evaluation is not None and m2.evaluation.merged is not None
    g0, g2 = m1.evaluation.base, m2.evaluation.merged
    assert m2.evaluation.base == pytest.approx(m1.evaluation.merged, abs=1e-4)  # g1 as published is g2's base
    assert all(g0[d] is not None and g2[d] is not None for d in m1.evaluation.domains)
    assert sum(g2.values()) < sum(g0.values()), (g0, g2)  # type: ignore[arg-type]
    assert (out / "latest").resolve() == second.resolve()
    AutoModelForCausalLM.from_pretrained(second)  # a plain Hugging Face checkpoint

    # a node that joins now starts on the newest base (fetched and verified before it loads a model),
    # not on generation 0's
    late = peers.start_node("late", "medical", *NODE_ARGS)
    wait_for(lambda: "starting on generation 2" in peers.log("late").read_text(), 120,
             "the late node starting on generation 2", interval_s=0.5, alive=[late])  # fmt: skip
    assert "now training on generation" not in peers.log("late").read_text()  # no switch needed

    for name in [*nodes, "late"]:  # the nodes saved their generation-1 expert before moving on, then went on
        peers.terminate(name)
    assert peers.wait_exit("late", 120) == 0
    for name in nodes:
        assert peers.wait_exit(name, 120) == 0
        meta = read_metadata(latest_checkpoint(peers.workdir / name))
        assert Path(meta.base_model).resolve().name.startswith("gen-000002"), meta.base_model
