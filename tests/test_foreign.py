"""A foreign expert in a live swarm: a node on another model (``tiny-smol``: the tiny architecture over
SmolLM2's tokenizer) in a swarm whose base is ``tiny`` (GPT-2's tokenizer). It trains in a group of its
own and does not follow the swarm's generations; the coordinator, merging with ``fuse``, collects it
on its own model, distils it into the next base through the cross-tokenizer alignment, and the signed
manifest names it with its architecture, tokenizer and weights hashes."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Peers

from cogen.core import models
from cogen.core.model_identity import model_identity
from cogen.core.procs import wait_for
from cogen.protocols.manifest import verify_manifest

NODE_ARGS = ["--inner-steps", "3", "--matchmaking-s", "1.5", "--averaging-timeout-s", "30"]
MOVED = re.compile(r"now training on generation (\d+)")


def test_a_foreign_expert_is_collected_fused_through_the_alignment_and_named_in_the_manifest(
    peers: Peers, tmp_path: Path, cache_dir: Path
) -> None:
    out = tmp_path / "coordinator"
    peers.start_coordinator(
        "--model", "tiny", "--generation-outer-steps", "3", "--max-generations", "1",
        "--out-dir", str(out), "--eval-blocks", "2", "--eval-block-size", "32", "--merge-method", "fuse",
        "--collect-timeout-s", "30",
        "--fuse-sequences", "4", "--fuse-length", "32", "--fuse-steps", "4", "--fuse-batch-size", "4",
        "--no-gate",
    )  # fmt: skip
    # the foreign node first: its group has applied outer steps by the time the swarm's generation ends
    foreign = peers.start_node("law-smol", "legal", *NODE_ARGS, "--model", "tiny-smol")
    wait_for(lambda: "saved training state at outer step" in peers.log("law-smol").read_text(), 180,
             "the foreign node training", interval_s=1.0, alive=[foreign])  # fmt: skip
    peers.start_node("med", "medical", *NODE_ARGS)
    alive = list(peers.procs.values())
    wait_for(lambda: MOVED.search(peers.log("med").read_text()), 300, "the medical node on generation 1",
             interval_s=1.0, alive=alive)  # fmt: skip

    foreign_log = peers.log("law-smol").read_text()
    assert "is not the swarm's base: training a foreign expert" in foreign_log, foreign_log[-3000:]
    assert not MOVED.search(foreign_log)  # it stays on its own model
    coordinator_log = peers.log("coordinator").read_text()
    assert "collected foreign expert 'legal' on tiny-smol" in coordinator_log, coordinator_log[-3000:]
    assert "could not collect" not in coordinator_log  # the foreign node is no member of a swarm group

    manifest = verify_manifest(out / "generations" / "gen-000001")
    assert manifest.method == "fuse" and [e.expert for e in manifest.experts] == ["medical"]
    assert manifest.fusion is not None
    by_kind = {s.kind: s for s in manifest.fusion.sources}
    source, expert = by_kind["source"], by_kind["expert"]
    smol = model_identity(models.resolve_model("tiny-smol", cache_dir))
    assert source.name == "legal@tiny-smol" and source.domain == "legal" and not source.same_tokenizer
    assert source.architecture == smol.architecture == "LlamaForCausalLM"
    assert source.tokenizer_sha256 != expert.tokenizer_sha256 and len(source.weights_sha256) == 64
    assert set(manifest.fusion.domains) == {"medical", "legal"}
    assert manifest.evaluation is not None and set(manifest.evaluation.domains) == {"medical", "legal"}
    # each node announces the model it trains on; the swarm's record announces the swarm's base
    tiny = model_identity(models.resolve_model("tiny", cache_dir))
    announced = {p["expert"]: p for p in peers.api("/api/peers")}
    assert (
        announced["legal"]["model"] == "tiny-smol" and announced["legal"]["model_sha256"] == smol.model_sha256
    )
    assert announced["medical"]["model_sha256"] == tiny.model_sha256 != smol.model_sha256
