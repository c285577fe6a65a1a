"""The quality benchmark's merges: every registered dense method, the routed mixture, Arrow and ``fuse``.

Weights come from the evaluation, as ``cogen-coordinator merge --eval-domains`` chooses them
(:func:`cogen.coordinator.merging.weights.ranking_weights`); the mixture is
:mod:`cogen.coordinator.merging.moe` with its router trained here; ``arrow`` the same experts behind
PEFT's zero-shot per-token router (``--arrow-top-k`` experts per token; every top-k from 1 to the
number of experts is measured too, ``arrow_top_k`` in the JSON); ``fuse`` is
:mod:`cogen.coordinator.merging.fusion` with the experts as its teachers (the linear merge as the
student's start), and its cost (teacher and student tokens, seconds, peak memory) is reported against
the linear merge's.
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
from cogen.coordinator.merging.fusion.fuse import FUSE, FuseOptions, Fusion
from cogen.coordinator.merging.fusion.student import StudentOptions
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
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, Any]]:
    """Each method's loss per domain; what the mixture's router did; what fusion cost."""
    weights = ranking_weights(matrix)
    kept = [e for e in experts if weights[e.label] > 0] or experts
    w = [weights[e.label] or 1.0 for e in kept]
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in registry.known():
        started = time.monotonic()
        model = load_base_fp32(path, CPU)
        merge_into(model, kept, w, registry.create(name, registry.MergeParams(density=args.density)))
        seconds[name] = time.monotonic() - started
        results[name] = finite(losses(model, blocks))
        print(f"  {name}: {fmt(results[name])} ({time.monotonic() - started:.0f} s)", flush=True)
    results[FUSE], fusion = fused_losses(args, path, kept, w, blocks, tokenizer)
    fusion["linear_seconds"] = seconds["linear"]
    fusion["seconds_ratio_to_linear"] = fusion["seconds"] / max(1e-9, seconds["linear"])
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
    routing = {
        "accuracy": report.accuracy,
        "confusion": report.confusion,
        "seconds": time.monotonic() - started,
    }
    results[moe.ARROW], routing["arrow_top_k"], routing["arrow_seconds"] = arrow_losses(
        args, path, experts, blocks
    )
    return results, routing, fusion


def arrow_losses(
    args: argparse.Namespace, path: str, experts: list[Any], blocks: dict[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Arrow's loss per domain at ``--arrow-top-k``, at every top-k, and the seconds of the first build
    and evaluation (no router training: the prototypes come from the adapters)."""
    sweep: dict[str, dict[str, float]] = {}
    seconds = 0.0
    for k in [args.arrow_top_k, *(k for k in range(1, len(experts) + 1) if k != args.arrow_top_k)]:
        started = time.monotonic()
        mixture = moe.build_arrow(
            load_base_fp32(path, CPU), experts, moe.ArrowOptions(top_k=k, seed=args.seed)
        )
        sweep[str(mixture.top_k)] = finite(losses(mixture, blocks))
        seconds = seconds or time.monotonic() - started
        print(f"  {moe.ARROW} top-{mixture.top_k}: {fmt(sweep[str(mixture.top_k)])} "
              f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
    return sweep[str(min(args.arrow_top_k, len(experts)))], sweep, seconds


def fused_losses(
    args: argparse.Namespace, path: str, kept: list[Any], w: list[float], blocks: dict[str, torch.Tensor],
    tokenizer: Any,
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """``fuse``'s loss per domain, and its cost."""
    started = time.monotonic()
    parent = load_base_fp32(path, CPU)
    student = StudentOptions(steps=args.fuse_steps, lr=args.fuse_lr, batch_size=args.fuse_batch_size,
                             rank=args.lora_rank, seed=args.seed)  # fmt: skip
    options = FuseOptions(length=args.block_size, sequences=args.fuse_sequences, student=student)
    fusion = Fusion(parent, tokenizer, kept, [], list(blocks), options)
    report = fusion.apply(parent, {e.label: weight for e, weight in zip(kept, w, strict=True)})
    elapsed = time.monotonic() - started
    result = finite(losses(parent, blocks))
    print(
        f"  {FUSE}: {fmt(result)} ({elapsed:.0f} s; {report.teacher_tokens} teacher and "
        f"{report.student_tokens} student tokens, peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB)",
        flush=True,
    )
    cost = {"seconds": elapsed, "teacher_tokens": report.teacher_tokens,
            "student_tokens": report.student_tokens, "peak_rss_bytes": report.peak_rss_bytes,
            "steps": report.steps,
            "fusion_weights": {s.name: s.fusion_weight for s in report.sources}}  # fmt: skip
    return result, cost


def finite(values: dict[str, float | None]) -> dict[str, float]:
    """Losses with ``None`` (not finite) as infinity, so that sums and comparisons still order them."""
    return {d: (v if v is not None else math.inf) for d, v in values.items()}


def fmt(values: dict[str, float]) -> str:
    """``domain loss, ...`` for a progress line."""
    return ", ".join(f"{d} {v:.4f}" for d, v in values.items())
