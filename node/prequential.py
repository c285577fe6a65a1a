"""Prequential losses: a node's free estimate of its expert's (and its base's) loss on unseen data.

Every batch of a shard's first epoch is seen once (the stream runs on across generations), and
:class:`cogen.node.trainer.ExpertTrainer` computes its loss *before* stepping on it, so that loss is a
fair sample of the current model's loss on unseen data of the domain. From a small shard's second
epoch on the text repeats (:meth:`cogen.core.data.TrainStream.repeats`), its losses are biased low, and
they are not claimed (counted in ``repeated``): the claims stay those of the first epoch, and an
expert whose generation saw only repeats makes none (the coordinator then evaluates it in full).
:class:`PrequentialTracker` (one per trainer, so one per generation) keeps

- the most recent ``window`` batches' per-row losses (their stream positions are consecutive; a batch's
  loss is their mean, the first :data:`~cogen.protocols.prequential.MAX_ROWS` rows of a larger batch),
- the first ``base_batches`` batch losses, if the trainer started from the base itself (every LoRA
  ``B`` matrix zero: a fresh adapter, nothing loaded from the group or from disk),
- per data source, the count, mean and variance of per-row losses (Welford's update),

and turns them into the :class:`cogen.protocols.prequential.Prequential` part of the node's progress.
Non-finite losses (a skipped update) are left out: no NaN reaches a record.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cogen.protocols.prequential import (
    MAX_BASE,
    MAX_ROW_LOSSES,
    MAX_ROWS,
    MAX_SOURCES,
    MAX_WINDOW,
    LossRun,
    Prequential,
    SourceStats,
    StreamSpec,
)

__all__ = ["PrequentialTracker", "starts_from_base"]

MAX_TRACKED_SOURCES = 4 * MAX_SOURCES  #: sources counted at most (the report keeps those with most rows)
MAX_SOURCE_NAME = 128


def starts_from_base(model: nn.Module) -> bool:
    """Whether ``model`` computes exactly its base: it has LoRA adapters and every ``lora_B`` is zero."""
    found = False
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                found = True
                if bool(param.detach().abs().max() != 0):
                    return False
    return found


@dataclass
class _Welford:
    rows: int = 0
    tokens: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, loss: float, tokens: int) -> None:
        self.rows += 1
        self.tokens += tokens
        delta = loss - self.mean
        self.mean += delta / self.rows
        self.m2 += delta * (loss - self.mean)

    @property
    def variance(self) -> float:
        return self.m2 / (self.rows - 1) if self.rows > 1 else 0.0


class PrequentialTracker:
    """Collects one generation's prequential losses (see the module)."""

    def __init__(self, window: int = 64, base_batches: int = 8):
        if not 1 <= window <= MAX_WINDOW or not 1 <= base_batches <= MAX_BASE:
            raise ValueError(f"window must be in [1, {MAX_WINDOW}] and base_batches in [1, {MAX_BASE}]")
        self.window: deque[tuple[int, list[float]]] = deque(maxlen=window)
        self.base_batches = base_batches
        self.base: list[tuple[int, list[float]]] = []
        self.from_base: bool | None = None  # decided at the first batch
        self.batches = 0
        self.repeated = 0  # batches of a second or later epoch, not claimed
        self.sources: dict[str, _Welford] = {}

    def observe(
        self,
        position: int,
        loss: float,
        row_losses: Sequence[float],
        row_sources: Sequence[str] | None,
        row_tokens: int,
        from_base: bool,
        unseen: bool = True,
    ) -> None:
        """One batch at stream ``position``: its mean loss, each row's loss and source (None: unknown),
        the tokens each row predicts, whether the model was the base when the first batch came, and
        whether the batch is text the model has not trained on (False from a small shard's second epoch
        on: its loss is no longer a sample of unseen data, so it is not claimed)."""
        if self.from_base is None:
            self.from_base = from_base
        if not unseen:
            self.repeated += 1
            return
        if not math.isfinite(loss) or not 0.0 <= loss <= 1e4:
            return
        rows = [float(r) for r in row_losses[:MAX_ROWS]]
        if not rows or not all(math.isfinite(r) and 0.0 <= r <= 1e4 for r in rows):
            return
        if self.window and position != self.window[-1][0] + 1:
            self.window.clear()  # positions in a run are consecutive (a stream restarted elsewhere)
        self.window.append((position, rows))
        self.batches += 1
        if (
            self.from_base
            and len(self.base) < self.base_batches
            and (not self.base or position == self.base[-1][0] + 1)
        ):
            self.base.append((position, rows))
        for row, source in zip(row_losses, row_sources or (), strict=False):
            if math.isfinite(row):
                self._source(source[:MAX_SOURCE_NAME] or "?").add(row, row_tokens)

    def _source(self, name: str) -> _Welford:
        stats = self.sources.get(name)
        if stats is None:
            if len(self.sources) >= MAX_TRACKED_SOURCES:
                name = "(other)"
                stats = self.sources.setdefault(name, _Welford())
            else:
                stats = self.sources[name] = _Welford()
        return stats

    def snapshot(self, generation: int, stream: StreamSpec) -> Prequential | None:
        """The record part, or None before the first finite loss."""
        if not self.window:
            return None
        top = sorted(self.sources.items(), key=lambda kv: (-kv[1].rows, kv[0]))[:MAX_SOURCES]
        return Prequential(
            generation=generation,
            stream=stream,
            batches=self.batches,
            window=_run(list(self.window)),
            base=_run(self.base) if self.base else None,
            sources=[
                SourceStats(
                    source=name,
                    rows=s.rows,
                    tokens=s.tokens,
                    loss_mean=min(max(s.mean, 0.0), 1e4),
                    loss_var=max(s.variance, 0.0),
                )
                for name, s in top
            ],
        )


def _run(pairs: list[tuple[int, list[float]]]) -> LossRun:
    """The run of the latest batches whose rows fit a record (:data:`MAX_ROW_LOSSES` in all)."""
    kept: list[tuple[int, list[float]]] = []
    total = 0
    for position, rows in reversed(pairs):
        if kept and total + len(rows) > MAX_ROW_LOSSES:
            break
        kept.append((position, rows))
        total += len(rows)
    kept.reverse()
    return LossRun(start=kept[0][0], rows=[rows for _, rows in kept])
