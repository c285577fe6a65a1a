"""How good is a merge? Experts against their merges against one centralised model, per domain.

Model over data: one LoRA expert per domain, each trained with cogen's own trainer
(``cogen.node.trainer.ExpertTrainer``, the step a node runs) on its domain's training split, against one
*centralised* LoRA of the same rank trained on the union of the domains with the same total number of
tokens (its batches cycle through the domains). The experts are then merged with every registered
dense method (weights from the evaluation, as ``cogen-coordinator merge --eval-domains`` chooses them)
and as the routed mixture ``moe`` (:mod:`cogen.coordinator.merging.moe`), behind its trained router and
behind PEFT's zero-shot Arrow router (``arrow``); every model is evaluated on
each domain's validation blocks with :func:`cogen.core.evaluation.validation_loss`.

Targets (from issue 5): with the best method, on every domain the merged loss is within 5% of that
domain's expert and below the base, and its mean over domains is at most the centralised model's;
``kendall_tau`` (the cheap ranking's agreement with the full evaluation) is at least 0.8.

Run ``python -m bench.merging.quality --help``; ``bench/README.md`` explains the figures. The models are
trained in ``quality_train.py``, merged in ``quality_merges.py``; this module ranks, judges and reports.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.merging import moe
from cogen.coordinator.merging.evaluate import domain_blocks, evaluate_experts, losses
from cogen.coordinator.merging.experts import load_experts
from cogen.coordinator.merging.fusion.fuse import FUSE
from cogen.coordinator.merging.merge import load_base_fp32
from cogen.coordinator.merging.weights import format_matrix
from cogen.core import models
from cogen.core.checkpoint import load_adapter
from cogen.protocols.manifest import EvalMatrix

from ..harness import new_parser, parse, run_main, write_report
from .quality_merges import finite, merged_losses
from .quality_train import CPU, train

logger = logging.getLogger("cogen.bench.merge_quality")
WITHIN = 0.05  # the best merge's loss may be at most 5% above the domain's expert
FUSE_WITHIN = 0.02  # fuse, as the dense next base: at most 2% above each domain's expert (issue 15)
TAU_TARGET = 0.8


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
    central_losses = finite(losses(load_adapter(base, central), blocks))
    print(format_matrix(matrix), flush=True)
    merged, routing, fuse_cost = merged_losses(args, path, experts, matrix, blocks, tokenizer, work)
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
    fused = {d: row["merged"][FUSE] for d, row in result["domains"].items()}
    result["targets"].update({
        "fuse_within_2pct_of_expert": all(fused[d] <= (1 + FUSE_WITHIN) * row["expert"]
                                          for d, row in result["domains"].items()),
        "fuse_below_base": all(fused[d] < row["base"] for d, row in result["domains"].items()),
        "fuse_mean_at_most_centralized": verdict(result["domains"], FUSE)["mean_at_most_centralized"],
    })  # fmt: skip
    result["fuse_cost"] = fuse_cost
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
    mean = {m: sum(merged[m].values()) / len(merged[m]) for m in (moe.NAME, moe.ARROW)}
    print(
        f"arrow (zero-shot, top-{min(args.arrow_top_k, len(domains))}) against the trained router: mean loss "
        f"{mean[moe.ARROW]:.4f} vs {mean[moe.NAME]:.4f} (ratio {mean[moe.ARROW] / mean[moe.NAME]:.4f}); "
        f"built and evaluated in {routing['arrow_seconds']:.0f} s vs {routing['seconds']:.0f} s; "
        "every top-k: "
        + ", ".join(f"{k}: {sum(v.values()) / len(v):.4f}" for k, v in routing["arrow_top_k"].items())
    )
    cost = fuse_cost
    print(
        f"fuse cost: {cost['seconds']:.0f} s ({cost['seconds_ratio_to_linear']:.0f}x the linear merge's "
        f"{cost['linear_seconds']:.1f} s), {cost['teacher_tokens']} teacher + {cost['student_tokens']} "
        f"student tokens, peak RSS {cost['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    for target, ok in result["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'} {target}")
    print(f"done in {result['seconds']:.0f} s", flush=True)
    write_report(args.json, result)
    return 0


#: what ``--quick`` sets (flags given explicitly still win)
QUICK = {"steps": 6, "eval_blocks": 4, "block_size": 64, "router_blocks": 8, "route_tokens": 32,
         "fuse_sequences": 8, "fuse_steps": 6}  # fmt: skip


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
    add("--arrow-top-k", type=int, default=3, help="arrow: experts mixed per token (every top-k is measured)")
    add("--density", type=float, default=0.5, help="ties / dare density")
    add("--fuse-sequences", type=int, default=32, help="fuse: fusion texts per domain (training split)")
    add("--fuse-steps", type=int, default=60, help="fuse: student steps")
    add("--fuse-batch-size", type=int, default=8, help="fuse: fusion texts per student step")
    add("--fuse-lr", type=float, default=2e-3, help="fuse: the student LoRA's learning rate")
    add("--threads", type=int, default=2, help="torch CPU threads")
    add("--seed", type=int, default=0)
    add("--work-dir", type=Path, default=None, help="where checkpoints go (default: a new temp dir)")
    args = parse(parser, argv)
    if len(args.domains) < 2 or len(set(args.domains)) != len(args.domains):
        parser.error("--domains needs at least 2 different domains")
    if min(args.steps, args.eval_blocks, args.router_blocks, args.route_tokens, args.fuse_sequences,
           args.fuse_steps, args.fuse_batch_size, args.arrow_top_k) < 1:  # fmt: skip
        parser.error(
            "--steps, --eval-blocks, --router-blocks, --route-tokens, --arrow-top-k and --fuse-* "
            "must be positive"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("merge_quality", lambda: run(args), model_errors=True)


if __name__ == "__main__":
    sys.exit(main())
