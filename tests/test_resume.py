"""A node's saved training state: exact round trip (8-bit optimizer included), refusals, shard claims."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cogen.core import models
from cogen.core.checkpoint import CheckpointError
from cogen.core.config import DataConfig, ModelConfig, NetworkConfig, NodeConfig, OptimConfig
from cogen.core.swarm import SwarmClient
from cogen.node.hardware import detect_hardware
from cogen.node.reporting import LossWindow, NodeReporter
from cogen.node.resume import find_state, restore
from cogen.node.service import ExpertNode
from cogen.node.shards import claim_shard
from cogen.node.trainer import ExpertTrainer
from cogen.node.training_state import TrainingState, read_state, save_state
from cogen.protocols import NodeInfo, ShardClaim

CPU = torch.device("cpu")


def _trainer(tiny_path: str, seed: int) -> ExpertTrainer:
    torch.manual_seed(seed)
    model = models.add_lora(models.load_base(tiny_path, "int8", CPU), ModelConfig(lora_rank=4), seed=0)
    optimizer = models.build_optimizer(models.trainable_parameters(model), OptimConfig())
    scheduler = models.warmup_schedule(optimizer, 10)
    batches = iter(lambda: torch.randint(0, 50257, (2, 16)), None)
    return ExpertTrainer(model, optimizer, scheduler, batches)


def _meta(trainer: ExpertTrainer, base: str = "tiny") -> TrainingState:
    return TrainingState(
        expert="medical", generation=0, base=base, peer_id="QmOld", outer_step=None, samples_at_anchor=0,
        steps=trainer.steps, samples=trainer.samples, tokens=trainer.tokens, skipped=0,
        batches_consumed=trainer.batches, shard=1, num_shards=4, data="[]", optimizer=None, scheduler={},
    )  # fmt: skip


def test_the_state_comes_back_exactly_and_training_goes_on_the_same(tmp_path: Path, tiny_path: str) -> None:
    first = _trainer(tiny_path, 0)
    for _ in range(3):
        first.step()
    save_state(tmp_path, _meta(first), first.model, first, None)
    saved = find_state(tmp_path, "medical", 0, "tiny")
    assert saved is not None and saved.meta.steps == 3 and saved.meta.batches_consumed == 3
    assert any(t.dtype == torch.uint8 for t in saved.tensors.values())  # 8-bit AdamW states, as tensors
    second = _trainer(tiny_path, 0)
    restore(saved, second.model, second, None, group_loaded=False)
    assert second.steps == 3 and second.scheduler.last_epoch == first.scheduler.last_epoch
    for a, b in zip(
        models.trainable_parameters(first.model), models.trainable_parameters(second.model), strict=True
    ):
        assert torch.equal(a, b)
    # the same next batch gives the same update: the optimizer's moments came back too
    batch = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(5))
    for t in (first, second):
        t.stream = iter([batch])
        t.step()
    for a, b in zip(
        models.trainable_parameters(first.model), models.trainable_parameters(second.model), strict=True
    ):
        assert torch.equal(a, b)


def test_a_state_is_not_loaded_into_another_base_and_bad_files_are_refused(
    tmp_path: Path, tiny_path: str
) -> None:
    trainer = _trainer(tiny_path, 0)
    trainer.step()
    path = save_state(tmp_path, _meta(trainer, base="sha256:abc"), trainer.model, trainer, None)
    assert find_state(tmp_path, "medical", 0, "tiny") is None  # same generation number, other base
    assert find_state(tmp_path, "legal", 0, "sha256:abc") is None
    assert find_state(tmp_path, "medical", 1, "sha256:abc") is None  # kept for generation 0
    assert find_state(tmp_path, "medical", 0, "sha256:abc") is not None
    meta = json.loads((path / "training_state.json").read_text())
    (path / "training_state.json").write_text(json.dumps(meta | {"state_version": 99}))
    with pytest.raises(CheckpointError, match="version"):
        read_state(path)
    (path / "training_state.json").write_text(json.dumps(meta))
    with open(path / "training_state.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(CheckpointError, match="sha256"):
        read_state(path)
    assert find_state(tmp_path, "medical", 0, "sha256:abc") is None  # says why in the log, starts fresh


def _client(**kw: object) -> SwarmClient:
    return SwarmClient(NetworkConfig(swarm="claims", host="127.0.0.1", record_ttl_s=5, **kw))  # type: ignore[arg-type]


def test_a_node_keeps_its_shard_claim_alive_and_announces_its_current_base(tmp_path: Path) -> None:
    """A claim published once expires after the record TTL and a newcomer could take the shard; a node's
    reporter renews it with the node's record in the background, however long the training loop is busy
    (a long averaging round). And after moving to a new base the node announces that base."""
    first = _client()
    other = _client(initial_peers=tuple(first.visible_maddrs()))
    reporter = None
    try:
        node = ExpertNode(
            NodeConfig(
                model=ModelConfig(model="tiny"),
                data=DataConfig(num_shards=4),
                output_dir=tmp_path,
                network=first.cfg,
            )
        )
        node.client, node.hardware = first, detect_hardware(CPU)
        node.shard = claim_shard(first, "medical", 4, 5.0, settle_s=0.2)
        base = tmp_path / "gen-000001-0123456789abcdef"
        base.mkdir()
        (base / "manifest.json").write_text("{}")
        node._set_base(1, str(base))
        reporter = NodeReporter(first, "medical", node._node_info, 5.0, LossWindow())
        reporter.claim = (node.shard, 4)
        reporter.set_state("averaging")  # then the training thread says nothing for two record lifetimes
        reporter.start()
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            time.sleep(5 / 3)
            claims = [e.record for e in other.fetch(ShardClaim) if isinstance(e.record, ShardClaim)]
            assert [c.shard for c in claims] == [node.shard], claims
        assert claim_shard(other, "medical", 4, 5.0, settle_s=0.2, preferred=node.shard) != node.shard
        (info,) = [e.record for e in other.fetch(NodeInfo) if isinstance(e.record, NodeInfo)]
        assert info.generation == 1 and info.model == base.name and info.state == "averaging", info
    finally:
        if reporter is not None:
            reporter.stop()
        other.shutdown()
        first.shutdown()
