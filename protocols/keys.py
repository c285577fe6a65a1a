"""DHT keys, each format written once. Every key is prefixed with the swarm's name, so swarms can share
one DHT:

- ``<swarm>_<kind>``: the records of one kind (``NodeInfo.KIND`` etc.), one subkey per owner
- ``<swarm>_<expert>_g<generation>``: an expert group's averagers on one generation's base, the
  pseudo-gradients' under ``<group>_delta``, the exactly averaged and shared state under ``<group>_state``,
  the robust aggregators' roster under ``<group>_roster`` and the members' exchange handler
  ``<group>_exchange`` (a libp2p protocol name, not a DHT key)
- ``<swarm>_<expert>_m<model>``: the same for a group on a foreign base (the first 16 hex digits of
  its model fingerprint), which trains on its own model and is fused as a teacher
"""

from __future__ import annotations

from typing import Final

from cogen.protocols.names import NAME_RULE, is_name
from cogen.protocols.records import RECORD_SCHEMAS

#: the suffixes of a group's two averagers (see :func:`delta_prefix`, :func:`state_prefix`)
DELTA_SUFFIX: Final = "_delta"
STATE_SUFFIX: Final = "_state"
ROSTER_SUFFIX: Final = "_roster"
EXCHANGE_SUFFIX: Final = "_exchange"


def check_swarm_name(name: str) -> str:
    """Return ``name`` if it is a valid swarm name, else raise ``ValueError``."""
    if not is_name(name):
        raise ValueError(f"invalid swarm name {name!r}: use {NAME_RULE}")
    return name


def swarm_key(swarm: str, kind: str) -> str:
    """The DHT key of ``kind`` records in ``swarm``, e.g. ``swarm_key("cogen", "nodes") == "cogen_nodes"``."""
    if kind not in RECORD_SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(RECORD_SCHEMAS)}")
    return f"{check_swarm_name(swarm)}_{kind}"


def group_prefix(swarm: str, expert: str, generation: int) -> str:
    """The DHT prefix of an expert group on one generation's base (members on different bases never
    average together); its averagers add :data:`DELTA_SUFFIX` and :data:`STATE_SUFFIX`."""
    if not is_name(expert):
        raise ValueError(f"invalid expert name {expert!r}: use {NAME_RULE}")
    return f"{check_swarm_name(swarm)}_{expert}_g{generation}"


def foreign_group_prefix(swarm: str, expert: str, model_sha256: str) -> str:
    """The DHT prefix of an expert group on a foreign base (another model than the swarm's, which does not
    follow the swarm's generations): members average only with members on the same model."""
    if not is_name(expert):
        raise ValueError(f"invalid expert name {expert!r}: use {NAME_RULE}")
    if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
        raise ValueError("a foreign group's model fingerprint is a sha256 in hex")
    return f"{check_swarm_name(swarm)}_{expert}_m{model_sha256[:16]}"


def delta_prefix(group: str) -> str:
    """The averager prefix of the pseudo-gradients of the group at ``group`` (:func:`group_prefix`)."""
    return group + DELTA_SUFFIX


def state_prefix(group: str) -> str:
    """The averager prefix of the group's shared state: what a joining node, or the coordinator
    collecting the expert, loads (with a :class:`cogen.protocols.group_state.GroupStateInfo`)."""
    return group + STATE_SUFFIX


def roster_prefix(group: str) -> str:
    """The averager prefix that forms the group's rounds when a robust aggregator exchanges whole deltas
    (its all-reduce carries one number; the deltas travel over :func:`exchange_name`)."""
    return group + ROSTER_SUFFIX


def exchange_name(group: str) -> str:
    """The libp2p protocol name under which the group's members serve their round data to each other."""
    return group + EXCHANGE_SUFFIX
