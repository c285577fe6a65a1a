"""Training the router: blocks of each domain's *training* split, cut into windows, and a multinomial
logistic regression fitted with L-BFGS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.moe.router import Router, sequence_features
from cogen.coordinator.merging.moe.spec import MixtureError
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches


def training_blocks(
    domains: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``max_blocks`` blocks of each domain's *training* split (the router never sees validation text)."""
    blocks = {}
    for domain in domains:
        try:
            stream = train_batches(
                get_corpus(domain), tokenizer, block_size=block_size, batch_size=max_blocks, shard=0,
                num_shards=1, seed=seed,
            )  # fmt: skip
            blocks[domain] = next(stream)
        except ValueError as e:
            raise MixtureError(f"no router training data for {domain!r}: {e}") from None
    return blocks


def _windows(blocks: torch.Tensor, route_tokens: int) -> torch.Tensor:
    """Cut ``[n, T]`` blocks into ``[n * (T // N), N]`` windows: more, varied training rows."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise MixtureError(f"expected non-empty [n, T] token blocks, got shape {tuple(blocks.shape)}")
    per_row = max(1, blocks.shape[1] // route_tokens)
    return blocks[:, : per_row * route_tokens].reshape(-1, min(route_tokens, blocks.shape[1]))


def train_router(
    base: nn.Module,
    examples: Mapping[str, torch.Tensor],
    *,
    route_tokens: int = 64,
    l2: float = 1e-3,
) -> Router:
    """Fit a router that sends each label's ``examples`` (``[n, T]`` training token blocks) to it.

    Multinomial logistic regression with an L2 penalty ``l2 · ‖W‖²`` on standardised features, solved
    with L-BFGS: deterministic, and a few hundred rows fit in a second.
    """
    if len(examples) < 2:
        raise MixtureError(f"a router needs at least 2 experts, got {len(examples)}")
    labels = list(examples)
    feats, targets = [], []
    for index, label in enumerate(labels):
        rows = sequence_features(base, _windows(examples[label], route_tokens), route_tokens)
        feats.append(rows)
        targets.append(torch.full((rows.shape[0],), index, dtype=torch.long))
    x, y = torch.cat(feats), torch.cat(targets)
    router = Router(labels, x.shape[1], route_tokens)
    router.mean.copy_(x.mean(dim=0))
    router.std.copy_(x.std(dim=0).clamp_min(1e-6))
    nn.init.zeros_(router.linear.weight)
    nn.init.zeros_(router.linear.bias)
    optimizer = torch.optim.LBFGS(router.linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(router(x), y) + l2 * router.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    router.requires_grad_(False)
    return router.eval()
