"""A hostile peer cannot steer the coordinator's generations with fake records.

Real peers on 127.0.0.1: the coordinator's DHT client, one honest group member that announces itself,
claims its outer steps and serves its group's state (a real state averager, as a node runs it), and a
hostile peer with cogen's validators that writes well-formed, properly signed (hivemind's
RSASignatureValidator) but lying records: an expert that never trains, outer steps that cannot have
happened, claims under the honest member's peer id. The schedule must neither wait on the ghost
forever nor end the generation on a lie, and a generation that cannot be merged must fail closed and
back off instead of retrying at once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.utils import get_dht_time

from cogen.coordinator.config import (
    CoordinatorConfig,
    CoordinatorKeys,
    MergeOptions,
    ScheduleConfig,
)
from cogen.coordinator.generations import GenerationLoop
from cogen.coordinator.schedule import GenerationSchedule
from cogen.coordinator.view import SwarmMonitor
from cogen.core.config import NetworkConfig
from cogen.core.procs import wait_for
from cogen.core.swarm import GroupStateAverager, SwarmClient
from cogen.protocols import GroupProgress, GroupStateInfo, Hardware, NodeInfo
from cogen.protocols.keys import group_prefix, state_prefix

NAMES = (
    "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
)
SHAPES = [(4, 64), (64, 4)]
_swarms = itertools.count()


def node_info(client: SwarmClient, expert: str, peer_id: str | None = None) -> NodeInfo:
    hardware = Hardware(device="cpu", device_name="cpu", memory_bytes=2**33, cpu_count=2,
                        supports_bf16=False, supports_fp16=False, supports_int8=True)  # fmt: skip
    now = get_dht_time()
    return NodeInfo(
        peer_id=peer_id or client.peer_id, expert=expert, hardware=hardware, software_version="0.1.0",
        model="tiny", precision="fp32", shard=0, num_shards=4, state="training",
        started_at=now, updated_at=now,
    )  # fmt: skip


def progress(client: SwarmClient, expert: str, outer_step: int, peer_id: str | None = None) -> GroupProgress:
    return GroupProgress(
        peer_id=peer_id or client.peer_id, expert=expert, outer_step=outer_step, inner_steps=3,
        compression="none", rounds_ok=outer_step, rounds_failed=0,
    )  # fmt: skip


def announce(client: SwarmClient, *records: NodeInfo | GroupProgress) -> None:
    for record in records:
        assert client.publish(record).result(timeout=30) is True


@dataclass
class Swarm:
    name: str
    coordinator: SwarmClient
    member: SwarmClient
    hostile: SwarmClient
    group: GroupStateAverager | None = None

    def serve_state(self, expert: str, outer_step: int) -> None:
        """The honest member announces ``expert`` at ``outer_step`` and serves its group's state."""
        info = GroupStateInfo(
            expert=expert, generation=0, base_model="tiny", precision="fp32", names=NAMES,
            adapter_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"},
            outer_step=outer_step, steps=3 * outer_step, samples=6 * outer_step, tokens=192 * outer_step,
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        tensors = [*(torch.randn(s, generator=g) * 0.01 for s in SHAPES), *(torch.zeros(s) for s in SHAPES)]
        self.group = GroupStateAverager(
            tensors, self.member.dht, prefix=state_prefix(group_prefix(self.name, expert, 0)),
            target_group_size=2, min_matchmaking_time=1.0, allow_state_sharing=True,
            metadata=info.to_wire, start=True,
        )  # fmt: skip
        announce(self.member, node_info(self.member, expert), progress(self.member, expert, outer_step))


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    name = f"sched{next(_swarms)}"
    coordinator = SwarmClient(NetworkConfig(swarm=name, host="127.0.0.1"))
    joined = NetworkConfig(swarm=name, host="127.0.0.1", initial_peers=tuple(coordinator.visible_maddrs()))
    member, hostile = SwarmClient(joined), SwarmClient(joined)
    s = Swarm(name, coordinator, member, hostile)
    try:
        yield s
    finally:
        if s.group is not None:
            s.group.shutdown()
        for client in (hostile, member, coordinator):
            client.shutdown()


def schedule_of(swarm: Swarm, outer_steps: int, age_s: float) -> GenerationSchedule:
    schedule = GenerationSchedule(
        swarm.coordinator, ScheduleConfig(generation_outer_steps=outer_steps, min_outer_step_s=1.0)
    )
    schedule.PROBE_RETRY_S = 0.5  # type: ignore[misc]  # the test need not wait out the real backoff
    schedule.begin(0, age_s=age_s)
    return schedule


def test_an_announced_expert_that_never_trains_cannot_hold_the_generation(swarm: Swarm) -> None:
    swarm.serve_state("medical", outer_step=3)
    announce(swarm.hostile, node_info(swarm.hostile, "ghost"), progress(swarm.hostile, "ghost", 0))
    schedule = schedule_of(swarm, outer_steps=3, age_s=60)
    wait_for(lambda: schedule.experts() == ["ghost", "medical"], 30, "both groups announced")
    # the old rule waited for every announced expert: the ghost never reaches 3, so never. Now the ghost's
    # state is probed; nobody serves it, and after a second failed probe it no longer counts
    assert schedule.due() is None  # one failed probe may be a busy group
    due = wait_for(schedule.due, 30, "the generation due without the ghost", interval_s=0.2)
    assert due.experts == ["medical"] and due.outer_steps == 3


def test_a_real_group_that_lags_behind_still_holds_the_generation(swarm: Swarm) -> None:
    swarm.serve_state("medical", outer_step=1)
    announce(swarm.hostile, node_info(swarm.hostile, "legal"), progress(swarm.hostile, "legal", 3))
    schedule = schedule_of(swarm, outer_steps=3, age_s=60)
    wait_for(lambda: schedule.experts() == ["legal", "medical"], 30, "both groups announced")
    for _ in range(3):  # medical's state answers at outer step 1: it is real, and not there yet
        assert schedule.due() is None
    assert schedule._verdicts["medical"].outer_step == 1


def test_impossible_and_borrowed_claims_are_not_believed(swarm: Swarm) -> None:
    swarm.serve_state("medical", outer_step=1)
    schedule = schedule_of(swarm, outer_steps=3, age_s=5)  # at most 5 outer steps can have happened
    # a member of medical (by its own NodeInfo) claims a million outer steps
    announce(swarm.hostile, node_info(swarm.hostile, "medical"), progress(swarm.hostile, "medical", 10**6))
    wait_for(lambda: len(swarm.coordinator.fetch(GroupProgress)) == 2, 30, "both claims readable")
    assert schedule.claims(schedule.members()) == {"medical": 1}
    assert schedule.due() is None
    # a claim under the honest member's peer id, from another owner key: not consistent with its group
    announce(swarm.hostile, progress(swarm.hostile, "medical", 4, peer_id=swarm.member.peer_id))
    wait_for(lambda: any(e.record.outer_step == 4 for e in swarm.coordinator.fetch(GroupProgress)), 30, "lie")
    assert schedule.claims(schedule.members()) == {"medical": 1} and schedule.due() is None


def _loop(swarm: Swarm, tmp_path: Path, tiny_path: str, **merge: Any) -> GenerationLoop:
    cfg = CoordinatorConfig(
        network=swarm.coordinator.cfg,
        schedule=ScheduleConfig(generation_outer_steps=3, collect_timeout_s=20),
        merge=MergeOptions(**merge), model=tiny_path, out_dir=tmp_path / "out",
        keys=CoordinatorKeys(identity=tmp_path / "id.pem"),
    )  # fmt: skip
    loop = GenerationLoop(swarm.coordinator, cfg, SwarmMonitor(swarm.coordinator), "http://127.0.0.1:1")
    loop.schedule.begin(0, age_s=60)
    return loop


def _collections(caplog: pytest.LogCaptureFixture) -> int:
    return sum("generation 0 ends: collecting" in r.getMessage() for r in caplog.records)


def test_a_plausible_lie_is_caught_by_the_collected_state_and_backs_off(
    swarm: Swarm, tmp_path: Path, tiny_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cogen.coordinator")
    swarm.serve_state("medical", outer_step=1)
    announce(swarm.hostile, node_info(swarm.hostile, "medical"), progress(swarm.hostile, "medical", 3))
    loop = _loop(swarm, tmp_path, tiny_path)
    wait_for(lambda: loop.schedule.due() is not None, 30, "the claim of 3 outer steps believed")
    loop.poll()  # collects medical: its state shows outer step 1, not 3
    assert _collections(caplog) == 1 and not loop.merging and loop._backoff.failures == 1
    assert not any((tmp_path / "out" / "collected").rglob("cogen.json"))  # nothing kept from that try
    for _ in range(5):  # within the backoff: no new collection, no merge, nothing published
        loop.poll()
    assert _collections(caplog) == 1 and loop.generation == 0 and loop.published == []


def test_a_merge_that_fails_publishes_nothing_and_retries_with_backoff(
    swarm: Swarm, tmp_path: Path, tiny_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cogen.coordinator")
    swarm.serve_state("medical", outer_step=3)
    loop = _loop(swarm, tmp_path, tiny_path, method="no-such-method")
    wait_for(lambda: loop.schedule.due() is not None, 30, "medical's 3 outer steps seen")
    loop.poll()  # collected; the merge starts in the background and fails
    assert _collections(caplog) == 1
    loop.wait(60)
    for _ in range(5):
        loop.poll()
    assert _collections(caplog) == 1 and loop._backoff.failures == 1 and loop._retry_at > 0
    assert loop.generation == 0 and loop.published == [] and loop.served() == set()
    assert not (tmp_path / "out" / "generations").exists() or not any(
        (tmp_path / "out" / "generations").iterdir()
    )
    assert any("generation 1 not published (attempt 1)" in r.getMessage() for r in caplog.records)
