"""The publishing gate's record, as it goes into the signed manifest and the coordinator's API.

A :class:`GateReport` says which candidate bases the coordinator tried for a generation and why each
was published or refused: per domain (the experts' domains and the general text that no expert trains
on), the parent's and the candidate's mean validation loss, the mean paired per-block change and its
bootstrap interval. A candidate is *worse* on a domain when that whole interval lies above zero. The
first candidate worse on no domain is published; when none is, the parent stays the base and the
report says why (``passed`` false: it is then served by the API only, there is no manifest to sign).

Every float is finite or ``null`` (the canonical JSON a manifest signs has no NaN or Inf). The decision
rule lives in ``cogen.coordinator.merging.gate``, the search in ``cogen.coordinator.merging.gating``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class GateDomain(BaseModel):
    """A candidate against its parent on one domain."""

    model_config = _CONFIG

    domain: str
    general: bool = Field(description="a text set no expert of the generation trains on")
    parent_loss: float
    candidate_loss: float | None = Field(description="null: not finite")
    change: float | None = Field(description="mean per-block change candidate - parent; null: not finite")
    interval: tuple[float, float] | None = Field(description="its bootstrap interval; null: not finite")
    worse: bool


class GateAttempt(BaseModel):
    """One candidate base: the experts' weights in it and its verdict."""

    model_config = _CONFIG

    weights: dict[str, float] = Field(description="expert -> merge weight in this candidate (0: left out)")
    scale: float = Field(gt=0, le=1, description="the merged delta is added times this")
    why: str = Field(max_length=300, description="why this candidate was tried")
    domains: list[GateDomain]
    passed: bool
    reason: str = Field(max_length=2000, description="one line: the verdict")


class GateReport(BaseModel):
    """Every candidate the gate judged for one generation, the first that passed (if any) last."""

    model_config = _CONFIG

    generation: int = Field(ge=1)
    passed: bool = Field(description="a candidate passed and is the published base")
    attempts: list[GateAttempt]
    level: float = Field(gt=0, lt=1, description="the bootstrap interval's level")
    bootstrap: int = Field(ge=1)
    seed: int = Field(ge=0)
    blocks_per_domain: int = Field(ge=1)
    seconds: float = Field(ge=0, description="what judging the candidates took")
    reason: str = Field(max_length=2000, description="one line: what was published or why nothing was")
