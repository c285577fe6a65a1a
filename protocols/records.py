"""Record schemas: what peers publish on the DHT.

Each record is a strict, frozen pydantic v2 model. Its class names its *kind* (``NodeInfo.KIND ==
"nodes"``), the suffix of the swarm-prefixed DHT key it lives under
(:func:`cogen.protocols.keys.swarm_key`). Values travel as msgpack dicts (never pickle) under that key,
with the owner's public key as subkey and the owner's RSA signature appended by hivemind's
``RSASignatureValidator``; :mod:`cogen.protocols.validation` checks them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cogen.protocols.names import NAME_PATTERN
from cogen.protocols.version import PROTOCOL_VERSION

# libp2p peer ids are base58 multihashes, e.g. 12D3KooW...
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{20,128}$"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
NonNegativeFinite = Annotated[Finite, Field(ge=0.0)]
PeerId = Annotated[str, Field(pattern=PEER_ID_PATTERN)]
ExpertName = Annotated[str, Field(pattern=NAME_PATTERN)]
Precision = Literal["int8", "bf16", "fp32"]


class Record(BaseModel):
    """Base of all DHT records: strict types, no extra fields, immutable, versioned."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    #: the key kind this record class lives under (every concrete record class sets it)
    KIND: ClassVar[str]

    protocol_version: int = Field(default=PROTOCOL_VERSION, ge=0, description="cogen wire protocol version")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready dict stored in the DHT."""
        return self.model_dump(mode="python")


class Hardware(BaseModel):
    """What a node trains on."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    device: str = Field(max_length=32, description="torch device, e.g. 'cpu' or 'cuda:0'")
    device_name: str = Field(max_length=128, description="human-readable device name")
    memory_bytes: int = Field(ge=0, description="device memory (RAM for CPU)")
    cpu_count: int = Field(ge=0)
    supports_bf16: bool
    supports_fp16: bool
    supports_int8: bool = Field(description="bitsandbytes 8-bit kernels are usable on this device")


class NodeInfo(Record):
    """A node announces itself: who it is, which expert it trains, on what."""

    KIND: ClassVar[str] = "nodes"

    peer_id: PeerId
    expert: ExpertName
    hardware: Hardware
    software_version: str = Field(max_length=64)
    model: str = Field(max_length=256, description="base model name or hash")
    precision: Precision
    shard: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    state: Literal["joining", "training", "averaging", "stopping"]
    metrics_url: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^http://",
        description="the node's own Prometheus /metrics, if served",
    )
    generation: int = Field(default=0, ge=0, description="the generation of the base it trains on")
    started_at: NonNegativeFinite
    updated_at: NonNegativeFinite


class TrainingProgress(Record):
    """A node's training progress on its expert."""

    KIND: ClassVar[str] = "progress"

    peer_id: PeerId
    expert: ExpertName
    step: int = Field(ge=0, description="inner steps done")
    samples: int = Field(ge=0, description="sequences trained on")
    tokens: int = Field(ge=0, description="tokens trained on")
    loss: float = Field(description="mean training loss over the last interval (NaN is reported, not hidden)")
    samples_per_second: NonNegativeFinite
    peak_memory_bytes: int = Field(
        ge=0, description="the process's peak RSS (on a GPU: peak CUDA allocation)"
    )
    # added after protocol 2 shipped; optional, so records of nodes that do not send them stay valid
    rss_bytes: int | None = Field(default=None, ge=0, description="the node process's resident memory now")
    gpu_memory_bytes: int | None = Field(
        default=None, ge=0, description="CUDA memory the node process holds now (null without a GPU)"
    )
    time: NonNegativeFinite = Field(description="DHT time of the report")


class SwarmInfo(Record):
    """The coordinator's announcement of the swarm it runs."""

    KIND: ClassVar[str] = "swarm"

    swarm: str = Field(max_length=64)
    coordinator_peer_id: PeerId
    api_url: str | None = Field(default=None, max_length=256)
    manifest_key: str | None = Field(
        default=None, max_length=1024, description="the public key (OpenSSH) that signs the swarm's manifests"
    )
    software_version: str = Field(max_length=64)
    started_at: NonNegativeFinite
    updated_at: NonNegativeFinite


class ShardClaim(Record):
    """A node claims a data shard of its expert's domain, so group members read different data."""

    KIND: ClassVar[str] = "shards"

    peer_id: PeerId
    expert: ExpertName
    shard: int = Field(ge=0)
    num_shards: int = Field(ge=1)


class RoundReport(BaseModel):
    """The outcome of one averaging round, as one member saw it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    outer_step: int = Field(ge=0, description="the outer step this round produced (or tried to)")
    ok: bool
    reason: str = Field(max_length=200, description="why a round failed; empty when it succeeded")
    group_size: int = Field(ge=0)
    duration_s: NonNegativeFinite
    bytes_sent: int = Field(ge=0, description="bytes this member sent (estimated from the wire format)")
    weight: NonNegativeFinite = Field(description="this member's weight: samples since its last outer step")
    time: NonNegativeFinite
    drift: NonNegativeFinite | None = Field(
        default=None,
        description="on a round followed by an exact state sync: the largest absolute difference between "
        "this member's anchor and the group's mean; null on other rounds (and in older records)",
    )
    drift_relative: NonNegativeFinite | None = Field(
        default=None, description="the same sync: L2 norm of that difference over the mean anchor's norm"
    )
    rejected: list[PeerId] = Field(
        default_factory=list, max_length=32, description="members whose update this round refused"
    )
    excluded: list[PeerId] = Field(
        default_factory=list,
        max_length=32,
        description="members excluded for repeated rejected updates: their deltas are ignored for a while",
    )


class GroupProgress(Record):
    """A group member's view of its expert group's outer steps."""

    KIND: ClassVar[str] = "groups"

    peer_id: PeerId
    expert: ExpertName
    outer_step: int = Field(ge=0)
    generation: int = Field(default=0, ge=0, description="the generation of the base the group trains on")
    inner_steps: int = Field(ge=1, description="H: inner steps per outer step")
    compression: Literal["8bit", "fp16", "none"]
    rounds_ok: int = Field(ge=0)
    rounds_failed: int = Field(ge=0)
    last_round: RoundReport | None = None


class CheckpointSource(Record):
    """A peer serves a published base over HTTP: the coordinator that made it, or a node that fetched it.

    Trust does not come from this record: whoever downloads checks the manifest's signature and every
    file's sha256 (:func:`cogen.protocols.manifest.verify_manifest`)."""

    KIND: ClassVar[str] = "checkpoints"

    peer_id: PeerId
    generation: int = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str = Field(max_length=256, pattern=r"^http://", description="directory URL holding manifest.json")
    time: NonNegativeFinite


#: every record class by its kind (see :mod:`cogen.protocols.keys`)
RECORD_SCHEMAS: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (NodeInfo, TrainingProgress, SwarmInfo, ShardClaim, GroupProgress, CheckpointSource)
}
