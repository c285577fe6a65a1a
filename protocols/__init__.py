"""The wire: what cogen peers say to each other on the DHT.

- ``version.py``    — protocol version, software version, :class:`IncompatibleProtocolError`
- ``keys.py``       — swarm-prefixed DHT keys
- ``records.py``    — strict pydantic v2 record schemas (:class:`NodeInfo`, :class:`TrainingProgress`, ...)
- ``validation.py`` — the record validator plugged into hivemind's DHT, next to its
  ``RSASignatureValidator``
"""

from cogen.protocols.keys import check_swarm_name, swarm_key
from cogen.protocols.records import (
    RECORD_SCHEMAS,
    CheckpointSource,
    GroupProgress,
    Hardware,
    NodeInfo,
    Record,
    RoundReport,
    ShardClaim,
    SwarmInfo,
    TrainingProgress,
)
from cogen.protocols.validation import (
    CogenRecordValidator,
    RecordRejected,
    check_record,
    make_validators,
    parse_record,
)
from cogen.protocols.version import PROTOCOL_VERSION, IncompatibleProtocolError, software_version

__all__ = [
    "PROTOCOL_VERSION",
    "RECORD_SCHEMAS",
    "CheckpointSource",
    "CogenRecordValidator",
    "GroupProgress",
    "Hardware",
    "IncompatibleProtocolError",
    "NodeInfo",
    "Record",
    "RecordRejected",
    "RoundReport",
    "ShardClaim",
    "SwarmInfo",
    "TrainingProgress",
    "check_record",
    "check_swarm_name",
    "make_validators",
    "parse_record",
    "software_version",
    "swarm_key",
]
