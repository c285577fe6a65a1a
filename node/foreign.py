"""A node on a foreign base: another model than the swarm's (another architecture, size or tokenizer).

Such a node cannot average with the swarm's groups nor follow its generations, yet its expert is still
worth having: the coordinator collects it and fuses it into the next base as a teacher
(:mod:`cogen.coordinator.merging.fusion`). At start a node compares the fingerprint of its ``--model``
(:func:`cogen.core.model_identity.model_identity`) with the one the swarm's trusted coordinator
announces (``SwarmInfo.model_sha256``); on another model it trains on its own base for good, in a group
of its own (:func:`cogen.protocols.keys.foreign_group_prefix`: only members on the same model average),
and announces its model's fingerprint, architecture and tokenizer hash in its ``NodeInfo``.
"""

from __future__ import annotations

import logging

from cogen.core.swarm import SwarmClient
from cogen.node.trust import KeyTrust
from cogen.protocols import SwarmInfo

logger = logging.getLogger(__name__)

__all__ = ["swarm_model"]


def swarm_model(client: SwarmClient, trust: KeyTrust) -> str | None:
    """The model fingerprint the swarm's trusted coordinator announces; ``None`` when no trusted
    coordinator is visible yet (the node then takes its model for the swarm's: start a node on a
    foreign model once the coordinator runs) or it announces none."""
    entries = client.fetch(SwarmInfo)
    trusted = trust.coordinators(client.cfg.swarm, entries)
    found = {e.record.model_sha256 for e in entries if e.owner in trusted and e.record.model_sha256}
    if not trusted:
        logger.info("no trusted coordinator is visible yet: taking --model for the swarm's base")
    return found.pop() if len(found) == 1 else None
