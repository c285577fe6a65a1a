"""Inner steps: train an expert's adapters on a stream of token batches."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

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
        model.train()

    def step(self) -> StepStats:
        batch = next(self.stream).to(self.device, non_blocking=True)
        self.batches += 1
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            loss = self.model(input_ids=batch, labels=batch).loss
        value = float(loss.detach())
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
