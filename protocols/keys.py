"""DHT keys. Every key is prefixed with the swarm's name, so swarms can share one DHT."""

from __future__ import annotations

import re
from typing import Final

SWARM_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")

#: key suffix -> what lives there (one subkey per owner, signed by that owner)
NODES: Final = "nodes"
PROGRESS: Final = "progress"
SWARM: Final = "swarm"
SHARDS: Final = "shards"
GROUPS: Final = "groups"
CHECKPOINTS: Final = "checkpoints"
KEY_KINDS: Final = (NODES, PROGRESS, SWARM, SHARDS, GROUPS, CHECKPOINTS)


def check_swarm_name(name: str) -> str:
    """Return ``name`` if it is a valid swarm name, else raise ``ValueError``."""
    if not SWARM_NAME_RE.match(name):
        raise ValueError(
            f"invalid swarm name {name!r}: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit"
        )
    return name


def group_prefix(swarm: str, expert: str, generation: int) -> str:
    """The averagers' DHT prefix of an expert group on one generation's base (members on different
    bases never average together; the coordinator loads a group's state under ``<prefix>_state``)."""
    return f"{check_swarm_name(swarm)}_{expert}_g{generation}"


def swarm_key(swarm: str, kind: str) -> str:
    """The DHT key of ``kind`` records in ``swarm``, e.g. ``swarm_key("cogen", "nodes") == "cogen_nodes"``."""
    if kind not in KEY_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(KEY_KINDS)}")
    return f"{check_swarm_name(swarm)}_{kind}"
