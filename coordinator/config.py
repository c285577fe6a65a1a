"""The coordinator's configuration: one frozen model per concern, nested into the two commands' configs.

- :class:`CoordinatorConfig` (``cogen-coordinator``, ``cogen dashboard``): ``network``, ``api``,
  ``view``, ``history``, ``schedule``, ``merge``, ``eval``, ``moe``, ``keys``, ``cache``, plus the
  base ``model`` and ``out_dir``;
- :class:`MergeConfig` (``cogen-coordinator merge``, offline): the same :class:`MergeOptions`,
  :class:`EvalConfig`, :class:`MixtureConfig`, :class:`SigningConfig` and cache, plus the experts.

The generation loop hands its ``merge``, ``eval``, ``moe``, ``keys`` and ``cache`` to the
:class:`MergeConfig` of each merge as they are: a merge option is declared once, here. Flags stay
flat (:mod:`cogen.core.settings`): the coordinator's ``merge`` carries the prefix ``merge``
(``--merge-method``, ``--merge-seed``), the offline merge's none (``--method``, ``--seed``). The models
of how a merge is made (options, evaluation, mixture, gate, fusion) are :mod:`.merge_options`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from cogen.coordinator.merge_options import (
    EvalConfig,
    Frozen,
    FuseConfig,
    GateConfig,
    MergeOptions,
    MixtureConfig,
)
from cogen.core.config import CacheConfig, NetworkConfig
from cogen.core.settings import FlagPrefix


class SigningConfig(Frozen):
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


class ApiConfig(Frozen):
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


class ViewConfig(Frozen):
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


class HistoryConfig(Frozen):
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


class ScheduleConfig(Frozen):
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


class CoordinatorConfig(Frozen):
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


class MergeConfig(Frozen):
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
