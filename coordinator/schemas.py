"""The API's response models: the swarm snapshot and its peers, expert groups, averaging rounds, generations.

Averaging (outer steps) and generations (merges) fill these as they land; until then a group has
``outer_step=None`` and ``last_round=None``, and the generation list is empty.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cogen.coordinator.alerts import Alert
from cogen.protocols.gate import GateReport


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class RoundSummary(_Frozen):
    """One averaging round (outer step) of an expert group."""

    outer_step: int = Field(description="the group's outer step; it starts again at each generation")
    generation: int = Field(default=0, description="the generation of the base the group trains on")
    finished_at: float = Field(description="unix time the round ended")
    group_size: int = Field(description="peers that took part")
    duration_s: float
    bytes_sent: int = Field(description="bytes sent by the group's members in this round")
    ok: bool = Field(description="the round completed and its average was applied")
    error: str | None = None
    excluded: list[str] = Field(
        default_factory=list, description="peer ids the group excluded for repeated rejected updates"
    )


class LossSeries(_Frozen):
    """One peer's training loss over time (parallel lists; ``null`` where the loss was NaN)."""

    peer: str = Field(description="the peer's short id")
    t: list[float] = Field(description="unix times of the reports")
    step: list[int]
    loss: list[float | None]


class GroupSummary(_Frozen):
    """The peers training one expert, and how their averaging goes."""

    expert: str
    members: int = Field(description="online peers training this expert")
    peers: list[str] = Field(description="short ids of the group's known peers, online or stale")
    samples_per_second: float
    tokens: int
    mean_loss: float | None
    outer_step: int | None = Field(default=None, description="the group's latest outer step; null before any")
    last_round: RoundSummary | None = Field(default=None, description="null: no averaging rounds yet")
    rounds_ok: int = 0
    rounds_failed: int = 0
    bytes_sent: int = Field(default=0, description="bytes sent in all averaging rounds seen")
    loss: list[LossSeries] = Field(default_factory=list, description="loss curve of each member")


class DomainScore(_Frozen):
    domain: str
    expert: str
    loss: float | None
    rank: int | None = None


class GenerationSummary(_Frozen):
    """One published checkpoint generation and how its experts scored."""

    generation: int
    base_hash: str = Field(description="content hash of the generation's base checkpoint")
    parent_hash: str | None = Field(description="base hash of the generation it was merged from")
    created_at: float
    manifest_hash: str
    signature_ok: bool | None = Field(description="the coordinator's signature verified; null: unchecked")
    merge_method: str | None = None
    ranking: list[str] = Field(default_factory=list, description="experts, best first")
    kendall_tau: float | None = Field(
        default=None, description="agreement of the cheap ranking (no forward passes) with the full one"
    )
    scores: list[DomainScore] = Field(default_factory=list, description="per-domain evaluation matrix")
    # the cheap ranking from the nodes' prequential claims (cogen.coordinator.merging.prequential)
    cheap_ranking: list[str] = Field(default_factory=list, description="experts by their claims, best first")
    audit: bool = Field(default=False, description="the full evaluation ran (an audit generation)")
    audit_kendall_tau: float | None = Field(default=None, description="cheap vs full order on the audit")
    audit_top1: bool | None = Field(default=None, description="both orders put the same expert first")
    cheap_cost_tokens: int | None = Field(default=None, description="forward-pass tokens of the spot-checks")
    full_cost_tokens: int | None = Field(
        default=None, description="forward-pass tokens of the full evaluation"
    )
    flagged: dict[str, str] = Field(
        default_factory=dict, description="expert -> why its claims did not hold (ranked last, not merged)"
    )
    gate: GateReport | None = Field(
        default=None, description="the publishing gate's candidates and verdicts (null: published without it)"
    )


class GateStatus(_Frozen):
    """The publishing gate's latest decisions: the newest published generation's, and a refusal since."""

    published: GateReport | None = Field(
        description="the gate's report in the newest published generation's manifest (null: none, or no gate)"
    )
    refused: GateReport | None = Field(
        description="the newest refusal after it: no candidate passed, the parent stayed the base"
    )


class AlertList(_Frozen):
    generated_at: float
    alerts: list[Alert]


class PeerSummary(_Frozen):
    id: str = Field(description="short, stable id: sha256 of the peer's public key")
    peer_id: str
    expert: str
    state: str = Field(description="joining, training, stopping, or stale (not heard from recently)")
    online: bool
    device: str
    device_name: str
    memory_bytes: int = Field(description="the machine's total memory: the GPU's on a GPU, else RAM")
    rss_bytes: int | None = Field(
        default=None, description="the node process's resident memory at its last report (null: not reported)"
    )
    gpu_memory_bytes: int | None = Field(
        default=None, description="CUDA memory the node process held at its last report (null: no GPU)"
    )
    precision: str
    generation: int = Field(default=0, description="the generation of the base the peer trains on")
    model: str = Field(default="", description="the model the peer trains on, as it names it")
    model_sha256: str | None = Field(
        default=None,
        description="fingerprint of the peer's --model (another than the swarm's: a foreign expert)",
    )
    software_version: str
    protocol_version: int
    shard: int
    step: int
    samples: int
    tokens: int
    loss: float | None = Field(description="mean training loss of the last interval; null if unknown or NaN")
    loss_is_nan: bool
    samples_per_second: float
    peak_memory_bytes: int
    last_seen_s: float = Field(description="seconds since this peer's last record")


class ExpertSummary(_Frozen):
    expert: str
    members: int = Field(description="online peers training this expert")
    samples_per_second: float
    tokens: int
    mean_loss: float | None


class SwarmSnapshot(_Frozen):
    swarm: str
    protocol_version: int
    software_version: str
    coordinator_peer_id: str
    initial_peers: list[str]
    generated_at: float
    peers_online: int
    samples_per_second: float
    generation: int | None = Field(
        default=None, description="the current generation; null before the first merge"
    )
    last_merge_at: float | None = Field(default=None, description="unix time of the last merge")
    alert_count: int = 0
    peers: list[PeerSummary]
    experts: list[ExpertSummary]
