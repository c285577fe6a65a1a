"""The coordinator's configuration: one frozen model per concern, nested into the two commands' configs.

- :class:`CoordinatorConfig` (``cogen-coordinator``, ``cogen dashboard``): ``network``, ``api``,
  ``view``, ``history``, ``schedule``, ``merge``, ``eval``, ``moe``, ``keys``, ``cache``, plus the
  base ``model`` and ``out_dir``;
- :class:`MergeConfig` (``cogen-coordinator merge``, offline): the same :class:`MergeOptions`,
  :class:`EvalConfig`, :class:`MixtureConfig`, :class:`SigningConfig` and cache, plus the experts.

The generation loop hands its ``merge``, ``eval``, ``moe``, ``keys`` and ``cache`` to the
:class:`MergeConfig` of each merge as they are: a merge option is declared once, here. Flags stay
flat (:mod:`cogen.core.settings`): the coordinator's ``merge`` carries the prefix ``merge``
(``--merge-method``, ``--merge-seed``), the offline merge's none (``--method``, ``--seed``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogen.core.config import CacheConfig, NetworkConfig
from cogen.core.settings import FlagPrefix


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MergeOptions(_Frozen):
    """How experts are merged into the next base (the methods of :mod:`cogen.coordinator.merging`)."""

    method: str = Field(
        default="linear",
        description="merge method: dare, dare_ties, fuse (distillation of the experts and --fuse-sources), "
        "linear, ties (linear: the best dense merge in bench/merging/quality.py on SmolLM2)",
    )
    density: float = Field(
        default=0.5, gt=0, le=1, description="fraction of each delta kept by ties / dare (1: keep all)"
    )
    seed: int = Field(default=0, ge=0, description="seed of DARE's random drops (per module, order-free)")
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="how ties / dare_ties elect each parameter's sign"
    )
    rank_bootstrap: int = Field(
        default=200, ge=0, le=100_000, description="bootstrap resamples behind the ranking's confidence"
    )


class EvalConfig(_Frozen):
    """How base, experts and merge are evaluated on each domain's validation split."""

    eval_blocks: int = Field(default=8, ge=1, le=100_000, description="validation blocks per domain")
    eval_block_size: int = Field(default=128, ge=8, le=32768, description="tokens per validation block")
    full_eval_every: int = Field(
        default=4,
        ge=1,
        le=1_000_000,
        description="evaluate every expert on every domain (the audit) on generations 1, 1+N, 1+2N, ...; "
        "the others rank and weight experts by their nodes' spot-checked prequential claims alone",
    )


class MixtureConfig(_Frozen):
    """The routed mixture of the experts (``moe``), built beside the dense merge."""

    mixture: bool = Field(
        default=True,
        description="with an evaluation, also build the routed mixture of the experts (moe), publish it "
        "beside the dense base and record the better of the two in the manifest",
    )
    router_blocks: int = Field(
        default=16, ge=1, le=10_000, description="training blocks per domain the mixture's router learns from"
    )
    mixture_routing: Literal["sequence", "arrow"] = Field(
        default="sequence",
        description="sequence: a router trained on the domains picks one expert per sequence; arrow: PEFT's "
        "zero-shot per-token router over the adapters' top singular vectors (no router training)",
    )
    arrow_top_k: int = Field(
        default=3,
        ge=1,
        le=64,
        description="arrow: experts mixed per token in each layer (PEFT's default; "
        "the best of 1, 2, 3 in bench/merging/quality.py)",
    )
    arrow_temperature: float = Field(
        default=1.0, gt=0, le=1000, description="arrow: temperature of the softmax over the top-k scores"
    )


class GateConfig(_Frozen):
    """The publishing gate: a candidate base is published only when not worse than its parent."""

    gate: bool = Field(
        default=True,
        description="with an evaluation, publish a candidate only when it is not worse than its parent on "
        "any evaluated domain or on the general text (beyond the bootstrap noise); else re-weight, retry, "
        "or keep the parent",
    )
    gate_attempts: int = Field(default=3, ge=1, le=20, description="candidates the gate judges per merge")
    gate_level: float = Field(default=0.9, gt=0, lt=1, description="level of the gate's bootstrap interval")
    gate_budget_s: float = Field(
        default=900.0, gt=0, le=86400, description="no new candidate after this many seconds of judging"
    )
    gate_general: tuple[str, ...] | None = Field(
        default=None,
        description="general text sets no expert trains on (default: the known domains no expert of the "
        "generation trains on)",
    )


class FuseConfig(_Frozen):
    """Method ``fuse``: the next base distilled from the experts and other sources (see fusion/fuse.py)."""

    fuse_sources: tuple[Path, ...] = Field(
        default=(),
        description="other teachers: cogen expert checkpoints on another base, or Hugging Face model dirs "
        "(another architecture, size or tokenizer)",
    )
    fuse_domains: tuple[str, ...] | None = Field(
        default=None,
        description="domains of the fusion corpus (default: the experts' and the sources' domains)",
    )
    fuse_sequences: int = Field(default=32, ge=1, le=100_000, description="fusion texts per domain")
    fuse_length: int = Field(default=128, ge=8, le=32768, description="student tokens per fusion text")
    fuse_top_k: int = Field(default=32, ge=1, le=4096, description="teacher log-probabilities kept per token")
    fuse_steps: int = Field(default=60, ge=0, le=1_000_000, description="student training steps")
    fuse_batch_size: int = Field(default=8, ge=1, le=4096, description="fusion texts per student step")
    fuse_lr: float = Field(default=2e-3, gt=0, le=1, description="the student LoRA's learning rate")
    fuse_rank: int = Field(default=16, ge=1, le=1024, description="the student LoRA's rank")
    fuse_kd_weight: float = Field(
        default=0.8, ge=0, le=1, description="weight of the distillation loss (the rest: language modelling)"
    )
    fuse_budget_s: float = Field(
        default=1800.0, gt=0, le=86400, description="the student stops training after this many seconds"
    )


class SigningConfig(_Frozen):
    """The key that signs published manifests."""

    identity: Path | None = Field(
        default=None,
        description="the PEM key that signs manifests, created on first use "
        "(default: <cache dir>/coordinator-identity.pem)",
    )


class CoordinatorKeys(SigningConfig):
    """The coordinator's keys: the manifest signer and its libp2p identity."""

    p2p_identity: Path | None = Field(
        default=None,
        description="the libp2p key (mode 0600, created on first use) that keeps the coordinator's peer id, "
        "and so the --initial-peers multiaddr nodes join with, the same across restarts (default: "
        "OUT/p2p-identity.key when the coordinator merges generations, else a new id at each start)",
    )


class ApiConfig(_Frozen):
    """Where the HTTP API (dashboard, JSON API, checkpoints, metrics) listens, and how it is announced."""

    api_host: str = Field(
        default="127.0.0.1",
        description="address the HTTP API (dashboard, checkpoints) listens on; nodes on other machines fetch "
        "bases from it, so bind a reachable address (0.0.0.0) in a swarm across machines",
    )
    api_port: int = Field(
        default=8765,
        ge=0,
        le=65535,
        description="HTTP port of the dashboard, API, /metrics, /healthz and /readyz (0: any free port)",
    )
    public_url: str | None = Field(
        default=None,
        description="the URL other machines reach the HTTP API at, where a proxy stands in front of it "
        "(default: http://<announce host or API host>:<API port>)",
    )
    ready_file: Path | None = Field(
        default=None, description="write the DHT multiaddrs and API URL here as JSON once serving"
    )

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError(f"public_url must be an http(s) URL without query, got {value!r}")
        return value


class ViewConfig(_Frozen):
    """How the coordinator watches the swarm."""

    poll_interval_s: float = Field(default=2.0, gt=0, le=600, description="seconds between DHT reads")
    stale_after_s: float = Field(
        default=90.0, gt=0, description="a peer not heard from for this long is shown as stale"
    )
    log_interval_s: float = Field(default=30.0, gt=0, description="seconds between summary lines")
    observer: bool = Field(
        default=False,
        description="join as a read-only observer (a DHT client that announces nothing); `cogen dashboard`",
    )


class HistoryConfig(_Frozen):
    """The dashboard's history of losses and averaging rounds (SQLite)."""

    keep_history: bool = Field(
        default=True, description="keep loss and averaging history in SQLite so it survives a restart"
    )
    history_path: Path | None = Field(
        default=None,
        description="SQLite file of the dashboard's history (default: <cache dir>/history-<swarm>.sqlite3)",
    )
    history_max_points: int = Field(
        default=2000, ge=10, le=1_000_000, description="loss points kept per peer; older ones are pruned"
    )
    history_retention_s: float = Field(
        default=7 * 86400.0, gt=0, description="history of peers not heard from for this long is dropped"
    )


class ScheduleConfig(_Frozen):
    """When a generation ends and how long its experts are waited for."""

    generation_s: float | None = Field(
        default=None,
        gt=0,
        description="end a generation after this many seconds (unset: by outer steps only)",
    )
    generation_outer_steps: int | None = Field(
        default=None, ge=1, description="end a generation once every expert group made this many outer steps"
    )
    max_generations: int | None = Field(default=None, ge=1, description="stop merging after this many")
    collect_timeout_s: float = Field(
        default=60.0, gt=0, description="how long to wait for a group to share its state"
    )
    min_outer_step_s: float = Field(
        default=0.05,
        gt=0,
        le=3600,
        description="the least time one outer step takes (a group's: inner steps plus matchmaking; a node "
        "training alone on a small model makes several a second): a member claiming more outer steps "
        "than the generation's age allows is not believed",
    )

    @property
    def ends_generations(self) -> bool:
        """Whether generations end at all (by time or by outer steps)."""
        return self.generation_s is not None or self.generation_outer_steps is not None


class CoordinatorConfig(_Frozen):
    """Everything ``cogen-coordinator`` needs."""

    network: NetworkConfig = NetworkConfig()
    api: ApiConfig = ApiConfig()
    view: ViewConfig = ViewConfig()
    history: HistoryConfig = HistoryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    merge: Annotated[MergeOptions, FlagPrefix("merge")] = MergeOptions()
    eval: EvalConfig = EvalConfig()
    moe: MixtureConfig = MixtureConfig()
    gating: GateConfig = GateConfig()
    fusion: FuseConfig = FuseConfig()
    keys: CoordinatorKeys = CoordinatorKeys()
    model: str = Field(default="smollm2-135m", description="the base of generation 0 (the nodes' --model)")
    out_dir: Path = Field(
        default=Path("runs/coordinator"), description="generations are published under OUT/generations/"
    )
    cache: CacheConfig = CacheConfig()


class MergeConfig(_Frozen):
    """``cogen-coordinator merge``: fuse expert checkpoints on disk into a new base, offline."""

    experts: tuple[Path, ...] = Field(
        default=(),
        validate_default=True,
        description="expert checkpoints: a node's output directory (with `latest`) or a checkpoint directory",
    )
    merge: MergeOptions = MergeOptions()
    weights: tuple[float, ...] = Field(
        default=(),
        description="one weight per expert, in --experts order (default: from the evaluation, else equal)",
    )
    out: Path = Field(
        default=Path("runs/merged"), description="publish under OUT/generations/gen-N, with OUT/latest"
    )
    generation: int | None = Field(
        default=None,
        ge=1,
        description="generation number to publish (default: one above the parent's and OUT's newest)",
    )
    model: str | None = Field(
        default=None, description="base model the experts are merged into (default: the experts' own)"
    )
    eval_domains: tuple[str, ...] = Field(
        default=(), description="evaluate base, experts and merge on these domains' validation splits"
    )
    eval: EvalConfig = EvalConfig()
    claims: Path | None = Field(
        default=None, description="the nodes' prequential claims (JSON, cogen.protocols.prequential.Claims)"
    )
    moe: MixtureConfig = MixtureConfig()
    gating: GateConfig = GateConfig()
    fusion: FuseConfig = FuseConfig()
    keys: SigningConfig = SigningConfig()
    device: str = Field(default="cpu", description="torch device for merging and evaluation: cpu, cuda, auto")
    cache: CacheConfig = CacheConfig()

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        if not value:
            raise ValueError("give at least one expert checkpoint directory")
        return value

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0 <= w < float("inf") for w in value):  # NaN fails every comparison
            raise ValueError("weights must be finite and non-negative")
        return value
