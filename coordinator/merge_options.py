"""How a merge is made, shared by the coordinator's generations and the offline merge: its method and
options, the evaluation, the routed mixture, the publishing gate and fusion — one frozen model each,
nested into :class:`cogen.coordinator.config.CoordinatorConfig` and ``MergeConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EvalConfig", "Frozen", "FuseConfig", "GateConfig", "MergeOptions", "MixtureConfig"]


class Frozen(BaseModel):
    """A config model: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MergeOptions(Frozen):
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


class EvalConfig(Frozen):
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


class MixtureConfig(Frozen):
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


class GateConfig(Frozen):
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


class FuseConfig(Frozen):
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
