"""Prequential signals: what a node learns for free about its expert's loss on unseen data.

Streaming training sees each batch once, so the loss a node computes on a batch *before* stepping on
it is an unbiased estimate of its current model's loss on unseen data of its domain (prequential
evaluation). A node reports, inside its signed :class:`cogen.protocols.records.TrainingProgress`:

- ``window``: the losses of its most recent batches, at consecutive stream positions, row by row (so
  a check can recompute exactly the rows it affords, not a noisy part of a batch mean); their mean
  estimates the expert's own-domain loss now (a little stale: each
  was computed before the steps that followed it);
- ``base``: the losses of the first batches of the generation, when the node started from the base
  itself (a fresh adapter, nothing loaded from a group or disk): the first is exactly the base's loss on
  an unseen batch, the next few are the base after a few warm-up steps; their mean estimates the base's
  loss on the same distribution;
- ``sources``: per data source (:func:`cogen.core.documents.source_of`: a corpus file or directory),
  the count, mean and variance of the per-row losses of the generation so far;
- ``stream``: what the batches were cut from, so that the coordinator can rebuild the batch at any
  reported position (:func:`cogen.core.data.train_batches` is deterministic) and spot-check a claim.

:class:`Claims` is what the coordinator gathers of them at the end of a generation, for its merge.

Sizes are bounded (a hostile node cannot send an unbounded list) and every loss is finite.
"""

from __future__ import annotations

import statistics
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cogen.protocols.records import MAX_COUNT, Count, ExpertName, Finite, Generation, NonNegativeFinite

MAX_WINDOW = 256  #: most recent batch losses a report carries
MAX_BASE = 32  #: base batch losses a report carries
MAX_SOURCES = 32  #: data sources a report carries (the ones with most rows)
MAX_ROWS = 64  #: rows of one batch whose losses a report carries
MAX_ROW_LOSSES = 4096  #: row losses one run carries in all

Loss = Annotated[Finite, Field(ge=0.0, le=1e4)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class StreamSpec(_Strict):
    """The arguments of :func:`cogen.core.data.train_batches` that decide every batch of a node's stream."""

    corpus: str = Field(min_length=1, max_length=256, description="the corpus name (or path) of the domain")
    shard: int = Field(ge=0, le=1 << 20)
    num_shards: int = Field(ge=1, le=1 << 20)
    seed: int = Field(ge=0, le=MAX_COUNT)
    block_size: int = Field(ge=2, le=1 << 20)
    batch_size: int = Field(ge=1, le=1 << 16)
    validation_fraction: float = Field(ge=0.0, le=1.0)


class LossRun(_Strict):
    """Per-row losses of the batches at consecutive stream positions ``start``, ``start + 1``, ...; a
    batch's loss (``losses[i]``) is the mean of its rows' (``rows[i]``)."""

    start: Count = Field(description="the stream position (0-based batch index) of the first batch")
    rows: list[Annotated[list[Loss], Field(min_length=1, max_length=MAX_ROWS)]] = Field(
        min_length=1, max_length=MAX_WINDOW, description="each batch's per-row losses, in its row order"
    )

    @model_validator(mode="after")
    def _bounded(self) -> LossRun:
        if sum(len(r) for r in self.rows) > MAX_ROW_LOSSES:
            raise ValueError(f"a loss run carries at most {MAX_ROW_LOSSES} row losses")
        return self

    @property
    def losses(self) -> list[float]:
        return [statistics.fmean(r) for r in self.rows]

    def head(self, count: int) -> LossRun:
        """The first ``count`` batches of the run."""
        return LossRun(start=self.start, rows=self.rows[:count])

    def tail(self, count: int) -> LossRun:
        """The last ``count`` batches of the run."""
        cut = max(len(self.rows) - count, 0)
        return LossRun(start=self.start + cut, rows=self.rows[cut:])

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def variance(self) -> float:
        """The sample variance of the batch losses (0 for a single batch)."""
        return statistics.variance(self.losses) if len(self.losses) > 1 else 0.0

    def positions(self) -> range:
        return range(self.start, self.start + len(self.losses))

    def loss_at(self, position: int) -> float:
        return statistics.fmean(self.rows[position - self.start])

    def rows_at(self, position: int) -> list[float]:
        return self.rows[position - self.start]


class SourceStats(_Strict):
    """Per-row prequential losses of one data source, over the generation so far."""

    source: str = Field(min_length=1, max_length=128)
    rows: Count = Field(ge=1)
    tokens: Count
    loss_mean: Loss
    loss_var: NonNegativeFinite = Field(description="sample variance of the per-row losses (0 for one row)")


class Prequential(_Strict):
    """A node's prequential signals for its expert in one generation (see the module)."""

    generation: Generation
    stream: StreamSpec
    batches: Count = Field(
        description="batches whose loss this node computed before stepping, this generation"
    )
    window: LossRun
    base: LossRun | None = Field(
        default=None, description="the first batches of the generation, when they were trained from the base"
    )
    sources: list[SourceStats] = Field(default_factory=list, max_length=MAX_SOURCES)


MAX_MEMBERS = 256  #: members' claims kept per expert


class Claims(_Strict):
    """What the coordinator gathered from the experts' progress records at the end of a generation: each
    member's latest :class:`Prequential` on that generation (written beside the collected experts)."""

    generation: Generation
    experts: dict[ExpertName, Annotated[list[Prequential], Field(max_length=MAX_MEMBERS)]] = Field(
        max_length=4096, description="expert name -> its members' claims"
    )
