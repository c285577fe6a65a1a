"""The router: a linear gate over a sequence's features (the base model's pooled embeddings and last
hidden state, adapters off), and how those features are computed."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.moe.spec import MixtureError


class Router(nn.Module):
    """A linear gate over standardised features; :attr:`labels` names its outputs, in order."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, labels: Sequence[str], features: int, route_tokens: int) -> None:
        super().__init__()
        if route_tokens < 1:
            raise MixtureError(f"route_tokens must be at least 1, got {route_tokens}")
        self.labels = tuple(labels)
        self.route_tokens = route_tokens
        self.linear = nn.Linear(features, len(self.labels))
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, experts]`` from features ``[n, hidden]``."""
        return self.linear((features - self.mean) / self.std)

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.linear.weight, "bias": self.linear.bias, "mean": self.mean, "std": self.std}
        return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def _adapters_off(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@torch.no_grad()
def sequence_features(
    model: nn.Module, input_ids: torch.Tensor, route_tokens: int, batch_size: int = 16
) -> torch.Tensor:
    """The base model's (adapters off) input embeddings and last hidden state, each mean-pooled over a
    row's first ``route_tokens`` tokens, side by side: ``[n, 2 * hidden]`` (what the words are, and
    what the model makes of them)."""
    device = next(p.device for p in model.parameters())
    prefix = input_ids[:, :route_tokens]
    out = []
    with _adapters_off(model):
        for start in range(0, prefix.shape[0], batch_size):
            batch = prefix[start : start + batch_size].to(device)
            states = model(input_ids=batch, output_hidden_states=True).hidden_states
            out.append(torch.cat([states[0].float().mean(dim=1), states[-1].float().mean(dim=1)], -1).cpu())
    return torch.cat(out)
