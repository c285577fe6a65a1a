"""The wire: what cogen peers say to each other on the DHT.

- ``version.py``    — protocol version, software version, :class:`IncompatibleProtocolError`
- ``names.py``      — the rule for swarm and expert names (they end up in DHT keys)
- ``keys.py``       — swarm-prefixed DHT keys, each format in one place (record kinds, group averagers)
- ``records.py``    — strict pydantic v2 record schemas (:class:`NodeInfo`, :class:`TrainingProgress`, ...),
  each naming its key kind (``NodeInfo.KIND``); a permissioned swarm's :class:`MemberInfo` and
  :class:`Revocations`
- ``credentials.py`` — :class:`Credential`: the swarm owner's signature on a member's public key
- ``prequential.py`` — :class:`Prequential`: a node's losses on batches before it stepped on them (its
  recent window, the base's first batches, per data source) and the :class:`StreamSpec` that rebuilds them
- ``group_state.py`` — :class:`GroupStateInfo`: what a group member sends with its shared state
  (parameter names, adapter config, outer step, training counters), and :func:`parse_group_state`
- ``group_round.py`` — :class:`RoundClaim` and :class:`RoundReveal`: what the members of an averaging
  round gather before it and reveal after it
- ``manifest.py``   — the signed manifest of a published base and :func:`verify_manifest`
- ``hashing.py``    — the sha256 of a file and of every file of a directory (one helper for all)
- ``ranking.py``    — :class:`Ranking`: a generation's expert ranking as the manifest and the API carry it
- ``gate.py``       — :class:`GateReport`: the publishing gate's attempts and verdicts (manifest, API)
- ``fusion.py``     — :class:`FusionReport`: what a ``fuse`` merge distilled from which teachers
- ``validation.py`` — the record validator plugged into hivemind's DHT, next to its
  ``RSASignatureValidator`` (not re-exported here: it imports hivemind, and a command's ``--help``
  reads the records and keys without it)
"""

from cogen.protocols.credentials import Credential
from cogen.protocols.group_state import GroupStateInfo, GroupStateRejected, parse_group_state
from cogen.protocols.keys import check_swarm_name, swarm_key
from cogen.protocols.records import (
    RECORD_SCHEMAS,
    CheckpointSource,
    GroupProgress,
    Hardware,
    MemberInfo,
    NodeInfo,
    Record,
    Revocations,
    RoundReport,
    ShardClaim,
    SwarmInfo,
    TrainingProgress,
)
from cogen.protocols.version import PROTOCOL_VERSION, IncompatibleProtocolError, software_version

__all__ = [
    "PROTOCOL_VERSION",
    "RECORD_SCHEMAS",
    "CheckpointSource",
    "Credential",
    "GroupProgress",
    "GroupStateInfo",
    "GroupStateRejected",
    "Hardware",
    "IncompatibleProtocolError",
    "MemberInfo",
    "NodeInfo",
    "Record",
    "Revocations",
    "RoundReport",
    "ShardClaim",
    "SwarmInfo",
    "TrainingProgress",
    "check_swarm_name",
    "parse_group_state",
    "software_version",
    "swarm_key",
]
