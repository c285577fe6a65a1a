"""Configuration: one frozen pydantic model per concern.

CLI flags, ``COGEN_*`` environment variables and config files (JSON or TOML) all fill these same
models (see :mod:`cogen.core.settings`); nothing is declared twice. Field names are unique across the
concerns so that each has exactly one flag (``lora_rank`` -> ``--lora-rank`` / ``COGEN_LORA_RANK``).

This module holds the node's models (:class:`NodeConfig` and its concerns) and what both sides share
(:class:`NetworkConfig`, :class:`CacheConfig`); the coordinator's live in :mod:`cogen.coordinator.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cogen.core.access_config import AccessConfig
from cogen.protocols.keys import check_swarm_name
from cogen.protocols.names import is_name

Precision = Literal["int8", "bf16", "fp32"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CacheConfig(_Frozen):
    """Where converted models (and, by default, keys and fetched bases) are kept on this machine."""

    cache_dir: Path | None = Field(
        default=None,
        description="where converted models are cached (default: $COGEN_CACHE_DIR or ~/.cache/cogen)",
    )


class ModelConfig(_Frozen):
    """Which base model, at which precision, with which adapters."""

    model: str = Field(
        default="smollm2-135m",
        description="base model: a built-in alias (smollm2-135m, tiny), a local directory or a hub id",
    )
    precision: Precision = Field(
        default="int8", description="base weights: int8 (bitsandbytes Linear8bitLt), bf16 or fp32"
    )
    device: str = Field(default="auto", description="torch device: auto, cpu, cuda, cuda:N")
    lora_rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank of the expert adapters")
    lora_alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA path")
    lora_targets: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="module names that get LoRA adapters",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in the backward pass to save memory"
    )
    cache: CacheConfig = CacheConfig()


class DataConfig(_Frozen):
    """Which text an expert trains on, cut how."""

    expert: str = Field(
        default="medical",
        description="the domain this node's expert learns: medical, legal, code, literature, or a directory",
    )
    block_size: int = Field(default=128, ge=8, le=32768, description="tokens per training sequence")
    batch_size: int = Field(default=4, ge=1, le=4096, description="sequences per inner step")
    num_shards: int = Field(
        default=16, ge=1, le=65536, description="shards each domain's training data is cut into"
    )
    validation_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="fraction of each domain's documents held out for validation"
    )
    seed: int = Field(default=0, ge=0, description="seed for data order and initialisation")


class OptimConfig(_Frozen):
    """How the expert's adapters are trained on each node (inner steps)."""

    optimizer: Literal["adamw8bit", "adamw"] = Field(
        default="adamw8bit", description="inner optimizer: bitsandbytes 8-bit AdamW, or torch AdamW (32-bit)"
    )
    lr: float = Field(default=1e-3, gt=0, le=1, description="peak learning rate of the inner optimizer")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(default=10, ge=0, description="linear learning-rate warm-up")
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradient clipping norm")


class NetworkConfig(_Frozen):
    """How a peer joins the swarm."""

    swarm: str = Field(default="cogen", description="swarm name; every DHT key is prefixed with it")
    initial_peers: tuple[str, ...] = Field(
        default=(), description="multiaddrs of peers already in the swarm (none: start a new swarm)"
    )
    host: str = Field(default="0.0.0.0", description="address the DHT listens on")
    port: int = Field(default=0, ge=0, le=65535, description="DHT port (0: any free port)")
    announce_host: str | None = Field(
        default=None,
        description="the address other machines reach this peer at, if not --host (a public IP, a "
        "port-forwarded router): announced for the DHT and every HTTP service this peer offers "
        "(checkpoints, mirror, metrics)",
    )
    client_mode: bool = Field(
        default=False,
        description="behind NAT or a firewall that drops inbound connections: dial out only (a hivemind "
        "client-mode peer); it trains and averages with its group but serves no records, state or bases",
    )
    record_ttl_s: float = Field(
        default=60.0,
        ge=5,
        le=3600,
        description="lifetime of this peer's DHT records; refreshed every third of it",
    )
    access: AccessConfig = Field(default_factory=AccessConfig, description="who may join the swarm")

    @field_validator("swarm")
    @classmethod
    def _swarm_name(cls, value: str) -> str:
        return check_swarm_name(value)


class GroupConfig(_Frozen):
    """How the nodes of one expert average what they learn (DiLoCo outer steps over hivemind)."""

    inner_steps: int = Field(default=50, ge=1, description="inner steps (H) between outer steps")
    outer_lr: float = Field(default=0.7, gt=0, le=10, description="outer SGD learning rate (DiLoCo: 0.7)")
    outer_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="outer Nesterov momentum (DiLoCo: 0.9)"
    )
    group_size: int = Field(
        default=16, ge=2, le=1024, description="target number of peers in one averaging round"
    )
    matchmaking_s: float = Field(
        default=5.0, gt=0, description="how long peers gather before an averaging round"
    )
    averaging_timeout_s: float = Field(
        default=120.0, gt=0, description="deadline of one averaging round; a slower peer joins the next one"
    )
    compression: Literal["8bit", "fp16", "none", "sparse"] = Field(
        default="8bit",
        description="wire format of the pseudo-gradients: blockwise 8-bit (fp16 for small tensors); sparse: "
        "the sparse_k largest of every sparse_chunk values, sparse_bits bits each, with error feedback, "
        "exchanged whole among the group",
    )
    sparse_k: int = Field(default=64, ge=1, le=32768, description="sparse: values kept per chunk")
    sparse_chunk: int = Field(default=4096, ge=1, le=32768, description="sparse: values per chunk")
    sparse_bits: int = Field(default=2, description="sparse: bits per kept value (2, 4 or 8)")
    error_decay: float = Field(
        default=1.0, gt=0, le=1, description="sparse: the error buffer is scaled by this before each round"
    )
    compression_threshold: int = Field(
        default=4096,
        ge=1,
        description="tensors with fewer elements than this travel as fp16 instead of 8-bit",
    )
    sync_every: int = Field(
        default=10,
        ge=1,
        description="every this many outer steps, also average the weights and momentum exactly",
    )
    join_timeout_s: float = Field(
        default=20.0, gt=0, description="how long a joining node looks for the group's state"
    )
    solo: bool = Field(default=False, description="train alone: no outer steps, no averaging")
    aggregator: Literal["mean", "trimmed_mean", "centered_clip"] = Field(
        default="mean",
        description="how the members' pseudo-gradients are combined: mean (hivemind's butterfly all-reduce) "
        "or a robust rule over every member's whole delta, exchanged among the group (trimmed_mean, "
        "centered_clip: one hostile member of 3 or more cannot steer the outer step)",
    )
    max_norm_ratio: float = Field(
        default=4.0,
        gt=1,
        description="a member's update of more than this times the group's median norm is rejected",
    )
    max_weight_ratio: float = Field(
        default=4.0,
        ge=1,
        description="a member's claimed weight counts at most this times the group's median",
    )
    max_samples_per_s: float = Field(
        default=2000.0,
        gt=0,
        description="samples per second no member's hardware can beat: a weight beyond that many times the "
        "group's median time since the last outer step is capped",
    )
    reject_limit: int = Field(
        default=2,
        ge=1,
        description="rejected updates after which a member is excluded from the group's rounds",
    )
    exclude_s: float = Field(
        default=600.0,
        gt=0,
        description="seconds an excluded member's updates are ignored (and it is reported)",
    )
    overlap: bool = Field(
        default=False,
        description="average in the background while the next inner steps run, applying each outer step "
        "one round late (off: bench/communication/ measures it 3.7-5.6 %% worse in loss, bench/swarm/wan.py "
        "0.92 -> 0.98 compute utilisation on a 100 Mbit/s link)",
    )

    @field_validator("sparse_bits")
    @classmethod
    def _sparse_bits(cls, value: int) -> int:
        if value not in (2, 4, 8):
            raise ValueError(f"sparse_bits must be 2, 4 or 8, got {value}")
        return value

    @model_validator(mode="after")
    def _sparse_k_fits(self) -> GroupConfig:
        if self.sparse_k > self.sparse_chunk:
            raise ValueError(f"sparse_k ({self.sparse_k}) cannot exceed sparse_chunk ({self.sparse_chunk})")
        return self


class FetchConfig(_Frozen):
    """How a node downloads a base from the peers that announce it, and when it tries again."""

    fetch_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="seconds one connect or read of a base download may block"
    )
    fetch_min_rate: float = Field(
        default=256 * 1024,
        gt=0,
        description="bytes/s a donor must sustain: a file may take fetch_grace_s + its declared size / this",
    )
    fetch_grace_s: float = Field(default=30.0, ge=0, description="seconds added to every file's deadline")
    fetch_backoff_s: float = Field(
        default=5.0, gt=0, description="first wait before a source that failed to deliver is tried again"
    )
    fetch_backoff_max_s: float = Field(
        default=600.0,
        gt=0,
        description="the longest wait between tries of a failing source (doubling, jittered)",
    )
    distrust_s: float = Field(
        default=6 * 3600.0,
        ge=0,
        description="seconds a source that served content its signed manifest contradicts is skipped",
    )
    max_unsized_file_bytes: int = Field(
        default=32 << 30,
        gt=0,
        description="largest file accepted from a manifest that declares no sizes (manifest version 1)",
    )


class NodeConfig(_Frozen):
    """Everything ``cogen-node`` needs."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    group: GroupConfig = GroupConfig()
    network: NetworkConfig = NetworkConfig()
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many inner steps")
    max_seconds: float | None = Field(default=None, gt=0, description="stop after training this long")
    log_interval_s: float = Field(default=10.0, gt=0, description="seconds between summary lines and reports")
    output_dir: Path = Field(default=Path("runs/node"), description="where the expert adapter is saved")
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="torch CPU threads (default: torch's)"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve this node's Prometheus /metrics, /healthz (alive: DHT answers) and /readyz "
        "(model loaded, training, on the latest base) on this port (0: any free)",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the node's /metrics, /healthz, /readyz listen on"
    )
    follow: bool = Field(
        default=True, description="move to each newer generation the coordinator publishes, at an outer step"
    )
    trusted_key: str | None = Field(
        default=None,
        description="public key (OpenSSH text, or a file holding it) that must sign the manifests "
        "(default: the first key the swarm's coordinator announces, pinned in "
        "<output dir>/trusted-key-<swarm>.pub and never replaced silently)",
    )
    bases_dir: Path | None = Field(
        default=None, description="where fetched bases are kept (default: <cache dir>/bases/<swarm>)"
    )
    serve_bases: bool = Field(default=True, description="serve fetched bases to other peers over HTTP")
    serve_host: str | None = Field(
        default=None, description="address the base mirror listens on (default: the DHT's --host)"
    )
    checkpoint_every: int = Field(
        default=5,
        ge=1,
        description="save the full training state (weights, anchor, momenta, optimizer, data position) "
        "every this many outer steps (solo: every this many times --inner-steps), and on SIGTERM; "
        "restarted with the same --output-dir, the node resumes from it",
    )
    grace_s: float = Field(
        default=25.0,
        gt=0,
        le=3600,
        description="after SIGTERM, abandon any averaging round, save and exit within this many seconds",
    )
    fetch: FetchConfig = FetchConfig()

    @field_validator("data")
    @classmethod
    def _expert_name(cls, value: DataConfig) -> DataConfig:

        if not is_name(value.expert) and not Path(value.expert).is_dir():
            raise ValueError(f"expert {value.expert!r} is neither a domain name nor an existing directory")
        return value
