"""What an :class:`~cogen.node.service.ExpertNode` knows while it runs, shared by its concerns.

The node is split by concern into layers, each a module and each using only the ones below it:
:mod:`~cogen.node.announcing` (its records and summaries), :mod:`~cogen.node.switching` (the base it
trains on, generation switching and joining its group), :mod:`~cogen.node.training` (the training
loop: inner and outer steps, saves) and :mod:`~cogen.node.service` (the node's lifecycle).
:class:`NodeState` declares the attributes they share; ``ExpertNode.__init__`` sets them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from cogen.core.config import NodeConfig
from cogen.core.swarm import SwarmClient
from cogen.node.reporting import LossWindow

if TYPE_CHECKING:
    from cogen.core.model_identity import ModelIdentity
    from cogen.node.follow import BaseFollower
    from cogen.node.group import GroupAverager
    from cogen.node.metrics import NodeMetrics
    from cogen.node.reporting import NodeReporter
    from cogen.node.trust import KeyTrust
    from cogen.protocols import Hardware


class NodeState:
    """The state of a running node (see the module's docstring)."""

    cfg: NodeConfig
    stop_event: threading.Event
    expert: str  # the expert's name on the wire
    started_at: float
    client: SwarmClient | None  # while the node is in the swarm
    hardware: Hardware
    shard: int
    losses: LossWindow  # inner steps since the last summary; first and last loss of this base
    reporter: NodeReporter | None
    group: GroupAverager | None  # None while solo or between generations
    metrics: NodeMetrics | None
    metrics_url: str | None
    follower: BaseFollower | None
    trust: KeyTrust  # the manifest key it follows (given, pinned on first use, or not known yet)
    generation: int
    base_name: str  # the base's path (or ``--model``)
    base_id: str  # its identity, for resuming
    base_label: str  # its announced name
    identity: ModelIdentity  # the --model's fingerprints (announced)
    foreign: bool  # trains on another model than the swarm's (cogen.node.foreign)
    _data_fingerprint: str  # what the data stream depends on besides the shard (for resuming)
    _saved_outer: int | None  # the outer step of the last saved training state
    _saved_at: tuple[int, int | None]  # (inner, outer step) of the last save
    _alone_logged: bool
