"""Validation loss of a model on packed token blocks."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def validation_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over ``blocks`` ``[n, T]``."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"expected a non-empty [n, T] block tensor, got shape {tuple(blocks.shape)}")
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]  # each row predicts T-1 tokens
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
