"""Inner steps: train an expert's adapters on a stream of token batches.

The loss of each batch is computed before stepping on it, row by row, and handed to the trainer's
:class:`cogen.node.prequential.PrequentialTracker` with the batch's stream position: the node's free
estimate of its expert's loss on unseen data.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogen.node.prequential import PrequentialTracker, starts_from_base

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    loss: float
    samples: int
    tokens: int
    seconds: float
    applied: bool  # False when the loss was not finite and the update was skipped


class ExpertTrainer:
    """One optimizer step per call on the next batch; skips (and counts) non-finite losses."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batches: Iterator[torch.Tensor],
        *,
        max_grad_norm: float = 1.0,
        row_sources: Callable[[int], tuple[str, ...] | None] | None = None,
        repeats: Callable[[int], bool] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = batches
        self.max_grad_norm = max_grad_norm
        self.device = next(p.device for p in model.parameters() if p.requires_grad)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.skipped = 0
        self.batches = 0  # batches taken from the stream: the data position a resumed node skips to
        self.row_sources = row_sources  # the data source of each row of the batch at a stream position
        self.repeats = repeats  # whether the batch at a stream position repeats text (a second epoch)
        self.prequential = PrequentialTracker()
        model.train()

    def step(self) -> StepStats:
        batch = next(self.stream).to(self.device, non_blocking=True)
        position = self.batches
        self.batches += 1
        start = time.perf_counter()
        from_base = self.prequential.from_base is None and starts_from_base(self.model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            logits = self.model(input_ids=batch).logits
        rows = row_losses(logits, batch)
        loss = rows.mean()
        value = float(loss.detach())
        sources = self.row_sources(position) if self.row_sources is not None else None
        per_row = rows.detach().float().tolist()
        unseen = self.repeats is None or not self.repeats(position)
        self.prequential.observe(position, value, per_row, sources, batch.shape[1] - 1, from_base, unseen)
        applied = math.isfinite(value)
        if applied:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped += 1
            logger.warning("non-finite loss at step %d: update skipped", self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.samples += batch.shape[0]
        self.tokens += batch.numel()
        return StepStats(value, batch.shape[0], batch.numel(), time.perf_counter() - start, applied)


def row_losses(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy (the causal-LM loss, before averaging over rows)."""
    shifted = logits[:, :-1].float()
    targets = batch[:, 1:]
    per_token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)
