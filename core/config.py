"""Configuration: one frozen pydantic model per concern.

CLI flags, ``COGEN_*`` environment variables and config files (JSON or TOML) all fill these same
models (see :mod:`cogen.core.settings`); nothing is declared twice. Field names are unique across the
concerns so that each has exactly one flag (``lora_rank`` -> ``--lora-rank`` / ``COGEN_LORA_RANK``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogen.protocols.keys import check_swarm_name
from cogen.protocols.names import is_name

Precision = Literal["int8", "bf16", "fp32"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    cache_dir: Path | None = Field(
        default=None,
        description="where converted models are cached (default: $COGEN_CACHE_DIR or ~/.cache/cogen)",
    )


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
    compression: Literal["8bit", "fp16", "none"] = Field(
        default="8bit",
        description="wire format of the pseudo-gradients: blockwise 8-bit (fp16 for small tensors)",
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
        "(default: the key the swarm's coordinator announces)",
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


class CoordinatorConfig(_Frozen):
    """Everything ``cogen-coordinator`` needs."""

    network: NetworkConfig = NetworkConfig()
    api_host: str = Field(
        default="127.0.0.1",
        description="address the HTTP API (dashboard, checkpoints) listens on; nodes on other machines fetch "
        "bases from it, so bind a reachable address (0.0.0.0) in a swarm across machines",
    )
    public_url: str | None = Field(
        default=None,
        description="the URL other machines reach the HTTP API at, where a proxy stands in front of it "
        "(default: http://<announce host or API host>:<API port>)",
    )
    api_port: int = Field(
        default=8765,
        ge=0,
        le=65535,
        description="HTTP port of the dashboard, API, /metrics, /healthz and /readyz (0: any free port)",
    )
    poll_interval_s: float = Field(default=2.0, gt=0, le=600, description="seconds between DHT reads")
    stale_after_s: float = Field(
        default=90.0, gt=0, description="a peer not heard from for this long is shown as stale"
    )
    log_interval_s: float = Field(default=30.0, gt=0, description="seconds between summary lines")
    ready_file: Path | None = Field(
        default=None, description="write the DHT multiaddrs and API URL here as JSON once serving"
    )
    observer: bool = Field(
        default=False,
        description="join as a read-only observer (a DHT client that announces nothing); `cogen dashboard`",
    )
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
    model: str = Field(default="smollm2-135m", description="the base of generation 0 (the nodes' --model)")
    cache_dir: Path | None = Field(
        default=None,
        description="where converted models are cached (default: $COGEN_CACHE_DIR or ~/.cache/cogen)",
    )
    generation_s: float | None = Field(
        default=None,
        gt=0,
        description="end a generation after this many seconds (unset: by outer steps only)",
    )
    generation_outer_steps: int | None = Field(
        default=None, ge=1, description="end a generation once every expert group made this many outer steps"
    )
    max_generations: int | None = Field(default=None, ge=1, description="stop merging after this many")
    merge_method: str = Field(
        default="linear",
        description="how experts are merged into the next base (linear: best dense merge in "
        "bench/merging/quality.py on SmolLM2)",
    )
    merge_density: float = Field(
        default=0.5, gt=0, le=1, description="fraction of each delta ties / dare keep"
    )
    eval_blocks: int = Field(default=8, ge=1, le=100_000, description="validation blocks per domain")
    eval_block_size: int = Field(default=128, ge=8, le=32768, description="tokens per validation block")
    mixture: bool = Field(
        default=True, description="also build and publish the routed mixture of the experts (moe)"
    )
    router_blocks: int = Field(
        default=16, ge=1, le=10_000, description="training blocks per domain the mixture's router learns from"
    )
    collect_timeout_s: float = Field(
        default=60.0, gt=0, description="how long to wait for a group to share its state"
    )
    out_dir: Path = Field(
        default=Path("runs/coordinator"), description="generations are published under OUT/generations/"
    )
    identity: Path | None = Field(
        default=None,
        description="the PEM key that signs manifests, created on first use "
        "(default: <cache dir>/coordinator-identity.pem)",
    )
    p2p_identity: Path | None = Field(
        default=None,
        description="the libp2p key (mode 0600, created on first use) that keeps the coordinator's peer id, "
        "and so the --initial-peers multiaddr nodes join with, the same across restarts (default: "
        "OUT/p2p-identity.key when the coordinator merges generations, else a new id at each start)",
    )

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError(f"public_url must be an http(s) URL without query, got {value!r}")
        return value


class MergeConfig(_Frozen):
    """``cogen-coordinator merge``: fuse expert checkpoints on disk into a new base, offline."""

    experts: tuple[Path, ...] = Field(
        default=(),
        validate_default=True,
        description="expert checkpoints: a node's output directory (with `latest`) or a checkpoint directory",
    )
    method: str = Field(default="linear", description="merge method: dare, dare_ties, linear, ties")
    density: float = Field(
        default=0.5, gt=0, le=1, description="fraction of each delta kept by ties / dare (1: keep all)"
    )
    seed: int = Field(default=0, ge=0, description="seed of DARE's random drops (per module, order-free)")
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="how ties / dare_ties elect each parameter's sign"
    )
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
    eval_blocks: int = Field(default=8, ge=1, le=100_000, description="validation blocks per domain")
    eval_block_size: int = Field(default=128, ge=8, le=32768, description="tokens per validation block")
    mixture: bool = Field(
        default=True,
        description="with --eval-domains, also build the routed mixture of the experts (moe), publish it "
        "beside the dense base and record the better of the two in the manifest",
    )
    router_blocks: int = Field(
        default=16, ge=1, le=10_000, description="training blocks per domain the mixture's router learns from"
    )
    rank_bootstrap: int = Field(
        default=200, ge=0, le=100_000, description="bootstrap resamples behind the ranking's confidence"
    )
    identity: Path | None = Field(
        default=None,
        description="the coordinator's PEM private key, created on first use "
        "(default: <cache dir>/coordinator-identity.pem)",
    )
    device: str = Field(default="cpu", description="torch device for merging and evaluation: cpu, cuda, auto")
    cache_dir: Path | None = Field(
        default=None,
        description="where converted models are cached (default: $COGEN_CACHE_DIR or ~/.cache/cogen)",
    )

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
