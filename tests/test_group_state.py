"""The group-state contract: what a member sends with its state is a schema, built by the node and
validated by the coordinator; malformed, oversized or non-finite metadata is refused in one line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.utils import MSGPackSerializer

from cogen.coordinator.collect import CollectError, collect_expert, save_group_state
from cogen.core import models
from cogen.core.checkpoint import latest_checkpoint, load_adapter, read_metadata
from cogen.core.config import DataConfig, GroupConfig, ModelConfig, NetworkConfig, NodeConfig
from cogen.core.swarm import SwarmClient
from cogen.node.group import GroupAverager
from cogen.node.service import ExpertNode
from cogen.node.trainer import ExpertTrainer
from cogen.protocols import GroupStateInfo, GroupStateRejected, parse_group_state
from cogen.protocols.group_state import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_NAME_CHARS, MAX_PARAMETERS
from cogen.protocols.keys import group_prefix

NAMES = (
    "base_model.model.layers.0.q_proj.lora_A.default.weight",
    "base_model.model.layers.0.q_proj.lora_B.default.weight",
)
SHAPES = [(4, 64), (64, 4)]


def state_info(**overrides: Any) -> dict[str, Any]:
    info = GroupStateInfo(
        expert="medical", generation=1, base_model="tiny", precision="int8", names=NAMES,
        adapter_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"],
                        "peft_type": "LORA", "layers_pattern": None},
        outer_step=2, steps=6, samples=12, tokens=384, first_loss=5.5, train_loss=4.25,
    )  # fmt: skip
    return {**info.to_wire(), **overrides}


def state_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    anchors = [torch.randn(shape, generator=g) for shape in SHAPES]
    return [*anchors, *(torch.zeros(shape) for shape in SHAPES)]


def nested(depth: int) -> Any:
    return [nested(depth - 1)] if depth else 0


def test_state_info_round_trips_through_the_wire() -> None:
    """hivemind sends the metadata as msgpack: what the coordinator parses is what the node built."""
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(state_info()))
    info = parse_group_state(wire)
    assert info.to_wire() == state_info()
    assert (
        info.names == NAMES
        and info.train_loss == 4.25
        and info.adapter_config["target_modules"] == ["q_proj"]
    )
    # a tuple (msgpack's extension type in hivemind) reads the same as a list
    assert parse_group_state({**state_info(), "names": NAMES}) == info


@pytest.mark.parametrize(
    ("metadata", "complaint"),
    [
        ([1, 2], "not a dict"),
        (state_info(train_loss=math.nan), "train_loss: .*finite"),
        (state_info(first_loss=-math.inf), "first_loss: .*finite"),
        (state_info(adapter_config={"lora_dropout": math.nan}), "adapter_config: .*non-finite"),
        (state_info(names=["x.lora_A.weight"] * (MAX_PARAMETERS + 1)), "names: .*more than"),
        (state_info(names=["x" * (MAX_NAME_CHARS + 1)]), "names.0: .*at most"),
        (state_info(names=[]), "names: .*at least 1"),
        (state_info(names="base_model.lora_A"), "names: .*tuple"),
        (state_info(names=[7]), "names.0: .*string"),
        (state_info(adapter_config={"pad": "x" * MAX_CONFIG_BYTES}), "adapter_config: .*bytes of JSON"),
        (state_info(adapter_config={"deep": nested(MAX_CONFIG_DEPTH + 1)}), "adapter_config: .*deeper"),
        (state_info(adapter_config={1: "int key"}), "adapter_config"),
        (state_info(adapter_config=["r", 4]), "adapter_config: .*dict"),
        (state_info(steps="6"), "steps: .*integer"),  # no coercion
        (state_info(samples=True), "samples: .*integer"),
        (state_info(outer_step=-1), "outer_step: .*greater"),
        (state_info(expert="Medical!"), "expert: .*pattern"),
        (state_info(precision="int4"), "precision"),
        (state_info(base_model="m" * 257), "base_model"),
        (state_info(pickle=b"\x80\x04"), "pickle: .*[Ee]xtra"),
        ({k: v for k, v in state_info().items() if k != "adapter_config"}, "adapter_config: Field required"),
        (state_info(protocol_version=99), "protocol 99"),
    ],
)
def test_malformed_oversized_or_nan_state_info_is_refused(metadata: Any, complaint: str) -> None:
    with pytest.raises(GroupStateRejected, match=complaint) as refused:
        parse_group_state(metadata)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("metadata", "tensors", "complaint"),
    [
        (state_info(train_loss=math.nan), state_tensors(), "refused its group state: train_loss"),
        (None, state_tensors(), "refused its group state: .*not a dict"),
        (state_info(expert="legal"), state_tensors(), "says it is 'legal' on generation 1"),
        (state_info(generation=0), state_tensors(), "on generation 0, not generation 1"),
        (state_info(), state_tensors()[:3], "3 tensors for 2 parameters"),
        (state_info(names=["a.weight", "b.weight"]), state_tensors(), "a.weight is not a LoRA parameter"),
        (state_info(), [torch.full((4, 64), math.nan), *state_tensors()[1:]], "holds NaN or Inf"),
        (state_info(outer_step=0), state_tensors(), "not applied its first outer step"),
    ],
)
def test_the_coordinator_refuses_a_bad_group_state_in_one_line_and_writes_nothing(
    tmp_path: Path, metadata: Any, tensors: list[torch.Tensor], complaint: str
) -> None:
    with pytest.raises(CollectError, match=complaint) as refused:
        save_group_state("medical", 1, "tiny", metadata, tensors, tmp_path)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_a_good_group_state_becomes_an_expert_checkpoint(tmp_path: Path) -> None:
    tensors = state_tensors()
    path = save_group_state("medical", 1, "/bases/gen-000001", state_info(), tensors, tmp_path)
    meta = read_metadata(path)  # the checkpoint's directory
    assert (meta.expert, meta.base_model, meta.precision) == ("medical", "/bases/gen-000001", "int8")
    assert (meta.outer_step, meta.steps, meta.samples, meta.tokens) == (2, 6, 12, 384)
    assert (meta.first_loss, meta.train_loss) == (5.5, 4.25)
    # the expert is recorded on the generation it trained on (the group state's), not generation 0
    assert meta.generation == 1 and path.name.startswith("gen-000001-step-")


def test_a_real_nodes_group_state_is_collected_by_the_coordinator(tmp_path: Path, tiny_path: str) -> None:
    """A node trains a few real steps alone (its progress becomes the group's state), builds its state
    info as it does in a swarm; the coordinator downloads the state over a real DHT and saves an expert
    whose adapter, loaded by PEFT, is exactly the node's trained LoRA weights."""
    cfg = NodeConfig(
        model=ModelConfig(model="tiny", precision="fp32", device="cpu"),
        data=DataConfig(expert="medical"),
        group=GroupConfig(matchmaking_s=1.0), output_dir=tmp_path / "node",
    )  # fmt: skip
    node = ExpertNode(cfg)
    model, optimizer, scheduler = node._build(tiny_path, torch.device("cpu"))
    seeds = (torch.Generator().manual_seed(s) for s in range(100))
    batches = (torch.randint(0, model.config.vocab_size, (2, 32), generator=g) for g in seeds)
    trainer = ExpertTrainer(model, optimizer, scheduler, batches)
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    group = coordinator = None
    try:
        prefix = group_prefix(cfg.network.swarm, node.expert, node.generation)
        group = GroupAverager(dht, prefix, models.trainable_parameters(model), cfg.group)
        group.state_info = node._state_info(model)  # as the node does when it joins its group
        node.group = group
        for _ in range(3):
            stats = trainer.step()
            node.losses.add(stats.loss, stats.samples, stats.seconds)
        node.losses.close()
        group.state_info = node._state_info(None, trainer)  # as it does at each outer step
        group.absorb_local(trainer.samples)  # alone: its progress is the group's state
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in trained.items())  # it did train

        coordinator = SwarmClient(
            NetworkConfig(
                swarm=cfg.network.swarm,
                host="127.0.0.1",
                initial_peers=tuple(map(str, dht.get_visible_maddrs())),
            )
        )
        path = collect_expert(coordinator, "medical", 0, tiny_path, tmp_path / "collected", timeout_s=60)
    finally:
        if coordinator is not None:
            coordinator.shutdown()
        if group is not None:
            group.shutdown()
        dht.shutdown()
    assert latest_checkpoint(tmp_path / "collected" / "medical") == path
    meta = read_metadata(path)
    assert (meta.outer_step, meta.steps, meta.samples, meta.tokens) == (1, 3, 6, 192)
    assert meta.precision == "fp32" and meta.first_loss == meta.train_loss == node.losses.last_loss
    loaded = load_adapter(models.load_base(tiny_path, "fp32", torch.device("cpu")), path)
    adapter = {n: p.detach() for n, p in loaded.named_parameters() if ".lora_" in n}
    assert adapter.keys() == trained.keys()
    for name, weights in trained.items():
        assert torch.equal(adapter[name], weights), name
