"""Record schemas: what peers publish on the DHT.

Each record is a strict, frozen pydantic v2 model. Its class names its *kind* (``NodeInfo.KIND ==
"nodes"``), the suffix of the swarm-prefixed DHT key it lives under
(:func:`cogen.protocols.keys.swarm_key`). Values travel as msgpack dicts (never pickle) under that key,
with the owner's public key as subkey and the owner's RSA signature appended by hivemind's
``RSASignatureValidator``; :mod:`cogen.protocols.validation` checks them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cogen.protocols.credentials import Credential
from cogen.protocols.names import NAME_PATTERN
from cogen.protocols.version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from cogen.protocols.prequential import Prequential

# libp2p peer ids are base58 multihashes, e.g. 12D3KooW...
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{20,128}$"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


#: the latest clock time a record may carry (the year 2286): a time beyond is garbage, not a clock skew
MAX_TIME = 1e10
#: how far in the future a record's time may be (relative to the reader's DHT time) before it is refused
MAX_CLOCK_SKEW_S = 300.0
#: counters (steps, samples, tokens, rounds) stay exact integers in every JSON reader
MAX_COUNT = 2**53
#: generations a swarm can reach (one a day for 2700 years)
MAX_GENERATION = 10**6

Finite = Annotated[float, AfterValidator(_finite)]
NonNegativeFinite = Annotated[Finite, Field(ge=0.0)]
Time = Annotated[Finite, Field(ge=0.0, le=MAX_TIME)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Generation = Annotated[int, Field(ge=0, le=MAX_GENERATION)]
PeerId = Annotated[str, Field(pattern=PEER_ID_PATTERN)]
ExpertName = Annotated[str, Field(pattern=NAME_PATTERN)]
Precision = Literal["int8", "bf16", "fp32"]


def from_the_future(t: float, now: float, skew_s: float = MAX_CLOCK_SKEW_S) -> bool:
    """Whether a record's time ``t`` is further ahead of ``now`` (the reader's DHT time) than clocks
    drift: such a record is refused (it would otherwise look fresh for ever, or jump a queue)."""
    return t > now + skew_s


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
    generation: Generation = Field(default=0, description="the generation of the base it trains on")
    model_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="fingerprint (:func:`cogen.protocols.hashing.model_fingerprint`) of the model given as "
        "--model: the generation-0 base this node's line of bases starts from; another one than the swarm's "
        "makes the node a foreign expert, trained on its own base and fused as a teacher",
    )  # fmt: skip
    architecture: str | None = Field(default=None, max_length=128, description="the model's architecture")
    tokenizer_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the model's tokenizer files"
    )
    started_at: Time
    updated_at: Time


class TrainingProgress(Record):
    """A node's training progress on its expert."""

    KIND: ClassVar[str] = "progress"

    peer_id: PeerId
    expert: ExpertName
    step: Count = Field(description="inner steps done")
    samples: Count = Field(description="sequences trained on")
    tokens: Count = Field(description="tokens trained on")
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
    time: Time = Field(description="DHT time of the report")
    prequential: Prequential | None = Field(
        default=None, description="losses on batches before stepping on them (protocol 4; see its module)"
    )


class SwarmInfo(Record):
    """The coordinator's announcement of the swarm it runs."""

    KIND: ClassVar[str] = "swarm"

    swarm: str = Field(max_length=64)
    coordinator_peer_id: PeerId
    api_url: str | None = Field(default=None, max_length=256)
    manifest_key: str | None = Field(
        default=None, max_length=1024, description="the public key (OpenSSH) that signs the swarm's manifests"
    )
    owner_signature: str | None = Field(
        default=None,
        max_length=1024,
        description="manifest_key's signature over the swarm name and this record's owner key "
        "(:func:`cogen.protocols.manifest.owner_statement`): without it the record steers no node",
    )
    software_version: str = Field(max_length=64)
    model_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="fingerprint of the swarm's generation-0 base (a node on another model is foreign)",
    )  # fmt: skip
    started_at: Time
    updated_at: Time


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

    outer_step: Count = Field(description="the outer step this round produced (or tried to)")
    ok: bool
    reason: str = Field(max_length=200, description="why a round failed; empty when it succeeded")
    group_size: int = Field(ge=0, le=1 << 20)
    duration_s: NonNegativeFinite
    bytes_sent: Count = Field(description="bytes this member sent (estimated from the wire format)")
    weight: NonNegativeFinite = Field(description="this member's weight: samples since its last outer step")
    time: Time
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
    outer_step: Count
    generation: Generation = Field(default=0, description="the generation of the base the group trains on")
    inner_steps: int = Field(ge=1, le=MAX_COUNT, description="H: inner steps per outer step")
    compression: Literal["8bit", "fp16", "none", "sparse"]
    rounds_ok: Count
    rounds_failed: Count
    last_round: RoundReport | None = None


class CheckpointSource(Record):
    """A peer serves a published base over HTTP: the coordinator that made it, or a node that fetched it.

    Trust does not come from this record: whoever downloads checks the manifest's signature and every
    file's sha256 (:func:`cogen.protocols.manifest.verify_manifest`)."""

    KIND: ClassVar[str] = "checkpoints"

    peer_id: PeerId
    generation: int = Field(ge=1, le=MAX_GENERATION)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str = Field(max_length=256, pattern=r"^http://", description="directory URL holding manifest.json")
    time: Time


class MemberInfo(Record):
    """A member announces its credential and the libp2p peer id it runs under, so that the averagers of
    other members admit that peer id (stored under the credential's key as subkey: only the member
    can write it)."""

    KIND: ClassVar[str] = "members"

    credential: Credential
    peer_id: PeerId
    time: NonNegativeFinite


class Revocations(Record):
    """The owner's signed list of revoked credential serials; the newest valid one wins."""

    KIND: ClassVar[str] = "revocations"

    swarm: str = Field(pattern=NAME_PATTERN, max_length=64)
    serials: tuple[int, ...] = Field(max_length=100_000)
    issued_at: int = Field(ge=0, lt=2**53, description="unix seconds; a newer list replaces an older one")
    signature: str = Field(pattern=r"^[A-Za-z0-9+/=]*$", max_length=1024, description="owner's, base64")

    def signed_bytes(self) -> bytes:
        serials = ",".join(str(s) for s in sorted(set(self.serials)))
        return f"cogen-revocations\n{self.swarm}\n{self.issued_at}\n{serials}".encode()


#: every record class by its kind (see :mod:`cogen.protocols.keys`)
RECORD_SCHEMAS: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (
        NodeInfo,
        TrainingProgress,
        SwarmInfo,
        ShardClaim,
        GroupProgress,
        CheckpointSource,
        MemberInfo,
        Revocations,
    )
}

from cogen.protocols.prequential import Prequential  # noqa: E402  (it builds on this module's types)

TrainingProgress.model_rebuild()
