"""The ranking of a generation's experts, as it goes into the signed manifest and the coordinator's API.

A :class:`Ranking` holds the full evaluation's verdict and, optionally, the cheap one:

- ``per_domain`` — on each evaluated domain, the experts best first, with their loss and their relative
  improvement on the base (and its bootstrap interval);
- ``overall`` — the experts best first, aggregated over domains by rank, never by raw loss: Borda
  points (each domain a voter) and Bradley–Terry strengths fitted to the pairwise wins the per-domain
  orders imply, with bootstrap confidence (blocks resampled within each domain);
- ``cheap`` — an order from signals the swarm already has (training losses, weight-space statistics of
  the deltas), with its Kendall tau against ``overall``.

Every float is finite (the canonical JSON a manifest signs has no NaN); a value that is not finite is
``null``. The computation lives in ``cogen.coordinator.merging.ranking``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

RANKING_VERSION = 1

_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DomainEntry(BaseModel):
    """One expert on one domain."""

    model_config = _CONFIG

    expert: str
    loss: float | None = Field(description="mean validation loss (nats/token); null: not finite")
    improvement: float | None = Field(
        description="(base loss − loss) / base loss; > 0: better than the base; null: undefined"
    )
    improvement_interval: tuple[float, float] | None = Field(
        default=None, description="bootstrap interval of the improvement at the ranking's level"
    )


class DomainRanking(BaseModel):
    """The experts on one domain, best (lowest loss) first; experts without a finite loss last."""

    model_config = _CONFIG

    base_loss: float | None = Field(description="the base's loss on this domain; null: not finite")
    blocks: int = Field(ge=1, description="validation blocks this domain was measured on")
    experts: list[DomainEntry]


class Standing(BaseModel):
    """One expert's place in the overall ranking."""

    model_config = _CONFIG

    expert: str
    rank: int = Field(ge=1, description="1: best")
    borda: float = Field(
        ge=0, description="Borda points summed over domains (n−1 for first place; ties share)"
    )
    strength: float = Field(description="Bradley–Terry log-strength (mean 0 over the experts)")
    rank_confidence: float | None = Field(
        default=None, ge=0, le=1, description="fraction of bootstrap resamples where it holds this rank"
    )
    rank_interval: tuple[int, int] | None = Field(
        default=None, description="bootstrap interval of its rank at the ranking's level"
    )
    strength_interval: tuple[float, float] | None = Field(
        default=None, description="bootstrap interval of its strength at the ranking's level"
    )


class CheapEntry(BaseModel):
    """One expert in the cheap ranking (no forward passes)."""

    model_config = _CONFIG

    expert: str
    rank: int = Field(ge=1)
    score: float | None = Field(
        description="relative training-loss drop (first − last) / first; null: degenerate"
    )
    first_loss: float | None = Field(description="training loss its nodes reported first")
    last_loss: float | None = Field(description="training loss its nodes reported last")
    delta_norm: float | None = Field(description="Frobenius norm of its dense delta over all modules")
    sign_agreement: float | None = Field(
        description="fraction of its nonzero delta coordinates whose sign agrees with the elected (sum) sign"
    )
    degenerate: str | None = Field(default=None, description="why it was ranked last without a score")


class CheapRanking(BaseModel):
    """The experts best first by the cheap score, and how well that agrees with the full ranking."""

    model_config = _CONFIG

    experts: list[CheapEntry]
    kendall_tau: float | None = Field(
        default=None, ge=-1, le=1, description="Kendall tau with the full overall order; null: < 2 experts"
    )


class Ranking(BaseModel):
    """A generation's ranking of its experts (see the module docstring)."""

    model_config = _CONFIG

    ranking_version: int = RANKING_VERSION
    domains: list[str]
    per_domain: dict[str, DomainRanking]
    overall: list[Standing] = Field(description="best first: by Bradley–Terry strength, then Borda points")
    bootstrap: int = Field(ge=0, description="bootstrap resamples (0: no confidence figures)")
    level: float = Field(gt=0, lt=1, description="coverage of the bootstrap intervals, e.g. 0.9")
    seed: int = Field(ge=0, description="seed of the bootstrap's numpy Generator")
    alpha: float = Field(gt=0, description="Bradley–Terry regularisation (choix ILSR pseudo-rate)")
    cheap: CheapRanking | None = None

    @property
    def order(self) -> list[str]:
        """The experts, best first."""
        return [s.expert for s in self.overall]


class PrequentialEntry(BaseModel):
    """One expert in the prequential ranking: its own-domain improvement on the base, from its nodes'
    claimed losses on batches before they stepped on them (:mod:`cogen.protocols.prequential`)."""

    model_config = _CONFIG

    expert: str
    domain: str = Field(description="the corpus its nodes streamed")
    rank: int = Field(ge=1)
    score: float | None = Field(
        description="lower end of its improvement's interval over the best improvement seen on its domain "
        "(the achievable): 1 is the best its domain allows; null: no usable claims"
    )
    improvement: float | None = Field(description="(base − window) / base of the pooled prequential means")
    improvement_interval: tuple[float, float] | None = Field(
        default=None, description="normal interval of the improvement at the ranking's level"
    )
    base_loss: float | None = Field(default=None, description="pooled mean of the base's first batches")
    loss: float | None = Field(default=None, description="pooled mean of the recent window")
    batches: int = Field(ge=0, description="claimed batch losses behind the estimate")
    checked: int = Field(default=0, ge=0, description="claimed batches the coordinator recomputed")
    flagged: str | None = Field(
        default=None, description="why its claims are not trusted: ranked last, not merged"
    )
    unscored: str | None = Field(
        default=None,
        description="why it has no score (no claims, no base claim, too few batches): ranked last, and the "
        "full evaluation weighs the merge",
    )


class PrequentialRanking(BaseModel):
    """The cheap ranking from prequential signals (what it measures: own-domain gain only; see the
    coordinator's ``merging.prequential``), with what it cost."""

    model_config = _CONFIG

    experts: list[PrequentialEntry]
    level: float = Field(gt=0, lt=1)
    cost_tokens: int = Field(ge=0, description="forward-pass tokens spent (the spot-checks of the claims)")


class Agreement(BaseModel):
    """How the cheap order agrees with the full evaluation's (an audit generation)."""

    model_config = _CONFIG

    kendall_tau: float | None = Field(ge=-1, le=1, description="scipy's Kendall tau-b; null: < 2 experts")
    top1: bool = Field(description="both put the same expert first")
    cheap_cost_tokens: int = Field(ge=0)
    full_cost_tokens: int = Field(ge=0, description="forward-pass tokens of the full evaluation")
