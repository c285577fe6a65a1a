"""How good is a merge? Experts against their merges against one centralised model, per domain.

Model over data: one LoRA expert per domain, each trained with cogen's own trainer
(``cogen.node.trainer.ExpertTrainer``, the step a node runs) on its domain's training split, against one
*centralised* LoRA of the same rank trained on the union of the domains with the same total number of
tokens (its batches cycle through the domains). The experts are then merged with every registered
dense method (weights from the evaluation, as ``cogen-coordinator merge --eval-domains`` chooses them)
and as the routed mixture ``moe`` (:mod:`cogen.coordinator.merging.moe`); every model is evaluated on
each domain's validation blocks with :func:`cogen.core.evaluation.validation_loss`.

Targets (from issue 5): with the best method, on every domain the merged loss is within 5% of that
domain's expert and below the base, and its mean over domains is at most the centralised model's;
``kendall_tau`` (the cheap ranking's agreement with the full evaluation) is at least 0.8.

Run ``python -m bench.merging.quality --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.merging import moe, registry
from cogen.coordinator.merging.evaluate import domain_blocks, evaluate_experts, losses
from cogen.coordinator.merging.experts import load_experts
from cogen.coordinator.merging.merge import load_base_fp32, merge_into
from cogen.coordinator.merging.weights import format_matrix, ranking_weights
from cogen.core import models
from cogen.core.checkpoint import (
    AdapterMetadata,
    latest_checkpoint,
    load_adapter,
    save_adapter,
)
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.node.trainer import ExpertTrainer
from cogen.protocols.manifest import EvalMatrix

from ..harness import new_parser, parse, run_main, write_report

logger = logging.getLogger("cogen.bench.merge_quality")
CPU = torch.device("cpu")
WITHIN = 0.05  # the best merge's loss may be at most 5% above the domain's expert
TAU_TARGET = 0.8


# ----------------------------------------------------------------------------- training


def _round_robin(streams: list[Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """One batch from each domain in turn: the centralised model sees the union in equal parts."""
    for stream in itertools.cycle(streams):
        yield next(stream)


def train(
    args: argparse.Namespace, path: str, tokenizer: Any, name: str, domains: list[str], steps: int, out: Path
) -> tuple[Path, float]:
    """Train one LoRA on ``domains`` for ``steps`` trainer steps; its checkpoint and relative loss drop."""
    model = models.add_lora(
        models.load_base(path, args.precision, CPU), ModelConfig(lora_rank=args.lora_rank), seed=args.seed
    )
    ocfg = OptimConfig(optimizer="adamw8bit", lr=args.lr, warmup_steps=args.warmup_steps)
    optimizer = models.build_optimizer(models.trainable_parameters(model), ocfg)
    streams = [
        train_batches(
            get_corpus(d),
            tokenizer,
            block_size=args.block_size,
            batch_size=args.batch_size,
            shard=0,
            num_shards=1,
            seed=args.seed,
        )
        for d in domains
    ]
    trainer = ExpertTrainer(
        model, optimizer, models.warmup_schedule(optimizer, ocfg.warmup_steps), _round_robin(streams)
    )
    history, started = [], time.monotonic()
    for step in range(1, steps + 1):
        history.append(trainer.step().loss)
        if step % max(1, steps // 5) == 0 or step == steps:
            print(
                f"  {name}: step {step}/{steps} loss {history[-1]:.3f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    meta = AdapterMetadata(
        expert=name,
        base_model=args.model,
        precision=args.precision,
        steps=trainer.steps,
        samples=trainer.samples,
        tokens=trainer.tokens,
        train_loss=history[-1],
    )
    save_adapter(model, out / name, meta)
    ckpt = latest_checkpoint(out / name)
    assert ckpt is not None
    window = max(1, steps // 5)  # mean of the first and last fifth of the steps: less noisy than one step
    first, last = sum(history[:window]) / window, sum(history[-window:]) / window
    return ckpt, (first - last) / first


# ----------------------------------------------------------------------------- ranking


def rank_agreement(cheap: dict[str, float], full: dict[str, float]) -> float:
    """Kendall's tau between the orders two scores give the same experts (higher is better in both),
    computed as the coordinator computes it (:func:`cogen.coordinator.merging.ranking.kendall_tau`).
    With fewer than 2 experts there is no order: 0."""
    from cogen.coordinator.merging.ranking import kendall_tau

    def order(scores: dict[str, float]) -> list[str]:
        return sorted(scores, key=lambda name: (-scores[name], name))

    tau = kendall_tau(order(cheap), order(full))
    return tau if tau is not None and math.isfinite(tau) else 0.0


def full_scores(matrix: EvalMatrix) -> dict[str, float]:
    """Each expert's mean relative improvement on the base over all evaluated domains."""
    scores = {}
    for expert, row in matrix.experts.items():
        gains = []
        for d in matrix.domains:
            base, loss = matrix.base.get(d), row.get(d)
            if base is not None and loss is not None and base > 0:
                gains.append((base - loss) / base)
        scores[expert] = sum(gains) / len(gains) if gains else -math.inf
    return scores


# ----------------------------------------------------------------------------- the merges


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
        results[name] = _finite(losses(model, blocks))
        print(f"  {name}: {_fmt(results[name])} ({time.monotonic() - started:.0f} s)", flush=True)
    started = time.monotonic()
    base = load_base_fp32(path, CPU)
    train_blocks = moe.training_blocks(
        list(blocks), tokenizer, args.block_size, args.router_blocks, args.seed
    )
    router = moe.train_router(base, train_blocks, route_tokens=args.route_tokens)
    mixture = moe.build_mixture(base, experts, router)
    report = moe.route(mixture, blocks)
    results[moe.NAME] = _finite(losses(mixture, blocks))
    saved = moe.save_mixture(work / "mixture", experts, router)
    print(
        f"  {moe.NAME}: {_fmt(results[moe.NAME])}, routing accuracy {report.accuracy:.3f} "
        f"({time.monotonic() - started:.0f} s; saved at {saved})",
        flush=True,
    )
    return results, {"accuracy": report.accuracy, "confusion": report.confusion}


def _finite(values: dict[str, float | None]) -> dict[str, float]:
    return {d: (v if v is not None else math.inf) for d, v in values.items()}


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{d} {v:.4f}" for d, v in values.items())


# ----------------------------------------------------------------------------- the run


def verdict(domains: dict[str, dict[str, Any]], method: str) -> dict[str, bool]:
    """The issue's targets for ``method``."""
    merged = {d: row["merged"][method] for d, row in domains.items()}
    mean = sum(merged.values()) / len(merged)
    central = sum(row["centralized"] for row in domains.values()) / len(domains)
    return {
        "within_5pct_of_expert": all(merged[d] <= (1 + WITHIN) * row["expert"] for d, row in domains.items()),
        "below_base": all(merged[d] < row["base"] for d, row in domains.items()),
        "mean_at_most_centralized": mean <= central,
    }


def table(domains: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """One row per model, one column per domain plus the mean; merges get their ratio to the expert."""
    width = max(12, *(len(d) + 2 for d in domains))
    head = f"{'model':<14}" + "".join(f"{d:>{width}}" for d in [*domains, "mean"]) + "   merged / expert"
    lines = ["validation loss (nats/token) per domain", head, "-" * len(head)]
    for row in ["base", "expert", "centralized", *methods]:
        values = [r["merged"][row] if row in methods else r[row] for r in domains.values()]
        line = f"{row:<14}" + "".join(f"{v:>{width}.4f}" for v in [*values, sum(values) / len(values)])
        if row in methods:
            line += "   " + " ".join(
                f"{v / r['expert']:.3f}" for v, r in zip(values, domains.values(), strict=True)
            )
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    path = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(path)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cogen-merge-quality-"))
    domains = list(args.domains)
    print(
        f"merge_quality: {args.model} ({args.precision}), domains {', '.join(domains)}, {args.steps} steps "
        f"x {args.batch_size} x {args.block_size} tokens per expert, work dir {work}",
        flush=True,
    )
    ckpts, drops = [], {}
    for domain in domains:
        ckpt, drop = train(args, path, tokenizer, domain, [domain], args.steps, work)
        ckpts.append(ckpt)
        drops[domain] = drop
    central, _ = train(args, path, tokenizer, "centralized", domains, args.steps * len(domains), work)
    print(f"trained {len(domains)} experts and the centralised model in {time.monotonic() - started:.0f} s")
    experts = load_experts(ckpts)
    blocks = domain_blocks(domains, tokenizer, args.block_size, args.eval_blocks)
    base, matrix = evaluate_experts(load_base_fp32(path, CPU), experts, blocks)
    central_losses = _finite(losses(load_adapter(base, central), blocks))
    print(format_matrix(matrix), flush=True)
    merged, routing = merged_losses(args, path, experts, matrix, blocks, tokenizer, work)
    methods = list(merged)
    result: dict[str, Any] = {"domains": {}}
    for d in domains:
        result["domains"][d] = {
            "base": matrix.base[d],
            "expert": matrix.experts[d][d],
            "centralized": central_losses[d],
            "merged": {m: merged[m][d] for m in methods},
        }
    best = min(methods, key=lambda m: sum(merged[m].values()))
    result["best_method"] = best
    result["kendall_tau"] = rank_agreement(drops, full_scores(matrix))
    result["targets"] = {
        **verdict(result["domains"], best),
        "kendall_tau_at_least_0.8": result["kendall_tau"] >= TAU_TARGET,
    }
    result["routing"] = routing
    result["cheap_scores"] = drops
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["seconds"] = time.monotonic() - started
    print()
    print(table(result["domains"], methods))
    print(
        f"\nbest method: {best}; kendall_tau {result['kendall_tau']:.3f} (target >= {TAU_TARGET}); "
        f"moe routing accuracy {routing['accuracy']:.3f}"
    )
    for target, ok in result["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'} {target}")
    print(f"done in {result['seconds']:.0f} s", flush=True)
    write_report(args.json, result)
    return 0


#: what ``--quick`` sets (flags given explicitly still win)
QUICK = {"steps": 6, "eval_blocks": 4, "block_size": 64, "router_blocks": 8, "route_tokens": 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__, {"quick": ("smoke test: 6 steps, 4 eval blocks, 64-token blocks", QUICK)})
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="base model (smollm2-135m, tiny, a directory)")
    add("--domains", nargs="+", default=["medical", "legal", "code"], help="at least 2 domains")
    add(
        "--precision",
        default="fp32",
        choices=["int8", "bf16", "fp32"],
        help="training precision of the base (int8: a node's default, slow on CPU)",
    )
    add("--steps", type=int, default=45, help="trainer steps per expert (the centralised model: x domains)")
    add("--batch-size", type=int, default=4)
    add("--block-size", type=int, default=128)
    add("--lr", type=float, default=2e-3)
    add("--warmup-steps", type=int, default=2)
    add("--lora-rank", type=int, default=16)
    add("--eval-blocks", type=int, default=16, help="validation blocks per domain")
    add("--router-blocks", type=int, default=32, help="training blocks per domain the router learns from")
    add("--route-tokens", type=int, default=64, help="tokens at the start of a sequence the router reads")
    add("--density", type=float, default=0.5, help="ties / dare density")
    add("--threads", type=int, default=2, help="torch CPU threads")
    add("--seed", type=int, default=0)
    add("--work-dir", type=Path, default=None, help="where checkpoints go (default: a new temp dir)")
    args = parse(parser, argv)
    if len(args.domains) < 2 or len(set(args.domains)) != len(args.domains):
        parser.error("--domains needs at least 2 different domains")
    if min(args.steps, args.eval_blocks, args.router_blocks, args.route_tokens) < 1:
        parser.error("--steps, --eval-blocks, --router-blocks and --route-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("merge_quality", lambda: run(args), model_errors=True)


if __name__ == "__main__":
    sys.exit(main())
