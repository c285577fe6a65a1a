"""Choosing a data shard that no other member of the expert's group is reading."""

from __future__ import annotations

import logging
import time

from cogen.core.data import shard_for_peer
from cogen.core.swarm import SwarmClient, owner_fingerprint
from cogen.protocols import ShardClaim

logger = logging.getLogger(__name__)


def _taken(client: SwarmClient, expert: str, num_shards: int, previous: str | None = None) -> dict[int, str]:
    """shard -> fingerprint of the other peer claiming it (not this node's own claim from before a
    restart: the peer id ``previous``)."""
    taken: dict[int, str] = {}
    for entry in client.fetch(ShardClaim):
        claim = entry.record
        if not isinstance(claim, ShardClaim) or entry.owner == client.owner or claim.peer_id == previous:
            continue
        if claim.expert == expert and claim.num_shards == num_shards:
            fp = owner_fingerprint(entry.owner)
            taken[claim.shard] = min(fp, taken.get(claim.shard, fp))
    return taken


def _first_free(preferred: int, num_shards: int, taken: dict[int, str]) -> int:
    for offset in range(num_shards):
        shard = (preferred + offset) % num_shards
        if shard not in taken:
            return shard
    return preferred  # more members than shards: share the preferred one


def renew_claim(client: SwarmClient, expert: str, shard: int, num_shards: int, ttl_s: float) -> None:
    """(Re)publish this node's claim on ``shard``; a node renews it as often as it announces itself, so
    the claim lives as long as the node does (not only one record lifetime)."""
    claim = ShardClaim(peer_id=client.peer_id, expert=expert, shard=shard, num_shards=num_shards)
    client.publish(claim, ttl_s)


def claim_shard(
    client: SwarmClient,
    expert: str,
    num_shards: int,
    ttl_s: float,
    settle_s: float = 1.0,
    rounds: int = 3,
    preferred: int | None = None,
    previous: str | None = None,
) -> int:
    """Claim a free shard of ``expert``'s data on the DHT and return it.

    Starts from ``preferred`` (a resumed node: the shard it read before) or the shard derived from this
    peer's id; if another member already claimed it, takes the next free one. Two peers that claim at the
    same moment see each other after ``settle_s``: the one with the larger fingerprint moves on. Claims
    by ``previous`` (this node's peer id before a restart) are its own.
    """
    start = shard_for_peer(client.peer_id, num_shards) if preferred is None else preferred % num_shards
    shard = _first_free(start, num_shards, _taken(client, expert, num_shards, previous))
    for _ in range(rounds):
        claim = ShardClaim(peer_id=client.peer_id, expert=expert, shard=shard, num_shards=num_shards)
        client.publish(claim, ttl_s).result()
        time.sleep(settle_s)
        taken = _taken(client, expert, num_shards, previous)
        rival = taken.get(shard)
        if rival is None or rival > client.fingerprint or len(taken) >= num_shards:
            return shard
        logger.info("shard %d of %s is also claimed by %s; moving on", shard, expert, rival)
        shard = _first_free(shard, num_shards, taken)
    return shard
