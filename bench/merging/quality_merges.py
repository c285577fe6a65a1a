"""The quality benchmark's merges: every registered dense method and the routed mixture, per domain.

Weights come from the evaluation, as ``cogen-coordinator merge --eval-domains`` chooses them
(:func:`cogen.coordinator.merging.weights.ranking_weights`); the mixture is
:mod:`cogen.coordinator.merging.moe` with its router trained here.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.merging import moe, registry
from cogen.coordinator.merging.evaluate import losses
from cogen.coordinator.merging.merge import load_base_fp32, merge_into
from cogen.coordinator.merging.weights import ranking_weights
from cogen.protocols.manifest import EvalMatrix

from .quality_train import CPU


def merged_losses(
    args: argparse.Namespace,
    path: str,
    experts: list[Any],
    matrix: EvalMatrix,
    blocks: dict[str, torch.Tensor],
    tokenizer: Any,
    work: Path,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Each method's loss per domain; and what the mixture's router did."""
    weights = ranking_weights(matrix)
    kept = [e for e in experts if weights[e.label] > 0] or experts
    w = [weights[e.label] or 1.0 for e in kept]
    results: dict[str, dict[str, float]] = {}
    for name in registry.known():
        started = time.monotonic()
        model = load_base_fp32(path, CPU)
        merge_into(model, kept, w, registry.create(name, registry.MergeParams(density=args.density)))
        results[name] = finite(losses(model, blocks))
        print(f"  {name}: {fmt(results[name])} ({time.monotonic() - started:.0f} s)", flush=True)
    started = time.monotonic()
    base = load_base_fp32(path, CPU)
    train_blocks = moe.training_blocks(
        list(blocks), tokenizer, args.block_size, args.router_blocks, args.seed
    )
    router = moe.train_router(base, train_blocks, route_tokens=args.route_tokens)
    mixture = moe.build_mixture(base, experts, router)
    report = moe.route(mixture, blocks)
    results[moe.NAME] = finite(losses(mixture, blocks))
    saved = moe.save_mixture(work / "mixture", experts, router)
    print(
        f"  {moe.NAME}: {fmt(results[moe.NAME])}, routing accuracy {report.accuracy:.3f} "
        f"({time.monotonic() - started:.0f} s; saved at {saved})",
        flush=True,
    )
    return results, {"accuracy": report.accuracy, "confusion": report.confusion}


def finite(values: dict[str, float | None]) -> dict[str, float]:
    """Losses with ``None`` (not finite) as infinity, so that sums and comparisons still order them."""
    return {d: (v if v is not None else math.inf) for d, v in values.items()}


def fmt(values: dict[str, float]) -> str:
    """``domain loss, ...`` for a progress line."""
    return ", ".join(f"{d} {v:.4f}" for d, v in values.items())
