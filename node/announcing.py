"""What a node tells the swarm while it trains: its ``NodeInfo`` in each state, its summaries, its group's
progress; and what it reads of its groupmates' announcements.

:class:`NodeAnnouncing` builds the records that :class:`~cogen.node.reporting.NodeReporter` publishes
and renews (see :mod:`cogen.node.state` for how the node's layers fit together).
"""

from __future__ import annotations

import time

import torch

from cogen.core.telemetry import peak_memory_bytes
from cogen.node.state import NodeState
from cogen.node.trainer import ExpertTrainer
from cogen.protocols import GroupProgress, NodeInfo, RoundReport, software_version
from cogen.protocols.prequential import StreamSpec


class NodeAnnouncing(NodeState):
    """The node's records and summaries."""

    def _report(self, trainer: ExpertTrainer, device: torch.device) -> None:
        assert self.reporter is not None
        peak = peak_memory_bytes(device)
        data = self.cfg.data
        stream = StreamSpec(
            corpus=data.expert, shard=self.shard, num_shards=data.num_shards, seed=data.seed,
            block_size=data.block_size, batch_size=data.batch_size,
            validation_fraction=data.validation_fraction,
        )  # fmt: skip
        prequential = trainer.prequential.snapshot(self.generation, stream)
        self.reporter.report(
            trainer.steps, trainer.samples, trainer.tokens, trainer.skipped, peak, prequential
        )

    def _node_info(self, state: str) -> NodeInfo:
        """This node's record in ``state`` (built by the reporter each time it publishes)."""
        assert self.client is not None
        return NodeInfo(
            peer_id=self.client.peer_id, expert=self.expert, hardware=self.hardware,
            software_version=software_version(), model=self.base_label[:256],
            precision=self.cfg.model.precision, shard=self.shard, num_shards=self.cfg.data.num_shards,
            state=state,  # type: ignore[arg-type]
            started_at=self.started_at, updated_at=time.time(), metrics_url=self.metrics_url,
            generation=self.generation, model_sha256=self.identity.model_sha256,
            architecture=self.identity.architecture, tokenizer_sha256=self.identity.tokenizer_sha256,
        )  # fmt: skip

    def _announce(self, state: str) -> None:
        assert self.reporter is not None
        self.reporter.set_state(state)

    def _publish_group(self, report: RoundReport | None) -> None:
        assert self.client is not None and self.group is not None and self.reporter is not None
        self.reporter.publish_group(GroupProgress(
            peer_id=self.client.peer_id, expert=self.expert, outer_step=self.group.outer_step,
            generation=self.generation, inner_steps=self.cfg.group.inner_steps,
            compression=self.cfg.group.compression,
            rounds_ok=self.group.rounds_ok, rounds_failed=self.group.rounds_failed,
            last_round=report or self.group.last_round,
        ))  # fmt: skip

    def _groupmates_online(self) -> bool:
        """Whether another node announces itself in this node's group: the expert on this generation, on
        the same model (a foreign node's group is its own; a cheap DHT read, no matchmaking)."""
        assert self.client is not None
        return any(
            entry.owner != self.client.owner and isinstance(entry.record, NodeInfo)
            and entry.record.expert == self.expert and entry.record.state != "stopping"
            and entry.record.generation == self.generation
            and _same_model(self.identity.model_sha256, entry.record.model_sha256)
            for entry in self.client.fetch(NodeInfo)
        )  # fmt: skip


def _same_model(mine: str | None, theirs: str | None) -> bool:
    """Whether two nodes' models are the same, as far as they say (a record without one: assumed)."""
    return mine is None or theirs is None or mine == theirs
