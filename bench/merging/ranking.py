"""Does the cheap ranking agree with the full one? Prequential claims against a full evaluation.

Per seed, experts are trained as nodes train them (``ranking_experts.py``): every domain at every
budget (``--budgets``), plus four flawed experts (diverged, trained on another domain's data, trained on
shuffled tokens, a liar that reports low losses). Then, as the coordinator does:

- the **full ranking** (:func:`cogen.coordinator.merging.ranking.rank_experts`): the base and every expert
  on every domain's validation blocks, Bradley–Terry over the per-domain orders, with bootstrap;
- the **cheap ranking** (:func:`cogen.coordinator.merging.screening.rank_claims`): each expert's own
  prequential claim, spot-checked on the trained expert within 2 % of the full evaluation's tokens, ranked
  by its own-domain gain as a fraction of what its domain achieved.

Keys: ``kendall_tau`` (mean over seeds of scipy's Kendall tau between the two orders; target >= 0.8),
``top1_agreement`` (fraction of seeds whose two top experts agree; target >= 2/3), ``cheap_cost_ratio``
(forward-pass tokens of the cheap ranking ÷ those of the full evaluation, the mean over seeds; target
<= 0.02), ``liar_caught`` (the liar flagged in every seed), ``flawed_last`` (the four flawed experts are
the cheap order's last four in every seed), and ``kendall_tau_own_domain`` (the cheap order against the
full evaluation's *own-domain* order: what the cheap signal measures, without the harm to other domains
that the full ranking also counts). ``bad_source_last`` (the data ranking) is ``null``: ranking data
sources is not built.

Run ``python -m bench.merging.ranking --help`` (``--quick``: the tiny model, seconds).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.merging.evaluate import domain_blocks, evaluate_blocks
from cogen.coordinator.merging.experts import load_experts
from cogen.coordinator.merging.merge import load_base_fp32
from cogen.coordinator.merging.prequential import agreement, evaluation_tokens
from cogen.coordinator.merging.ranking import kendall_tau, rank_experts
from cogen.coordinator.merging.screening import rank_claims
from cogen.coordinator.merging.spotcheck import BUDGET_FRACTION
from cogen.core import models
from cogen.protocols.manifest import EvalMatrix

from ..harness import new_parser, parse, ratio_line, run_main, table_lines, targets_json, write_report
from .ranking_experts import CPU, Trained, plans, train

TARGETS = {
    "kendall_tau": (">=", 0.8),
    "top1_agreement": (">=", 2 / 3),
    "cheap_cost_ratio": ("<=", BUDGET_FRACTION),
}


def own_domain_order(matrix: EvalMatrix, trained: list[Trained], flagged: set[str]) -> list[str]:
    """The experts by the full evaluation's own-domain gain as a fraction of their domain's best
    (flagged experts last, in the cheap ranking's convention)."""
    gain = {}
    for t in trained:
        d = t.plan.domain
        base, loss = matrix.base.get(d), matrix.experts[t.plan.label].get(d)
        gain[t.plan.label] = (base - loss) / base if base and loss is not None else -math.inf
    best = {t.plan.domain: max(gain[u.plan.label] for u in trained if u.plan.domain == t.plan.domain)
            for t in trained}  # fmt: skip
    score = {
        label: -math.inf if label in flagged else g / best[t.plan.domain] if best[t.plan.domain] > 0 else g
        for t in trained
        for label, g in [(t.plan.label, gain[t.plan.label])]
    }
    return sorted(score, key=lambda label: (-score[label], label))


def one_seed(args: argparse.Namespace, path: str, tokenizer: Any, seed: int, work: Path) -> dict[str, Any]:
    """Train this seed's experts, rank them both ways, and compare."""
    print(f"seed {seed}: training", flush=True)
    trained = [train(args, path, tokenizer, plan, seed, work / f"seed-{seed}") for plan in plans(args, seed)]
    experts = load_experts([t.checkpoint for t in trained])
    labels = [e.label for e in experts]
    assert labels == [t.plan.label for t in trained], labels
    blocks = domain_blocks(args.domains, tokenizer, args.eval_block_size, args.eval_blocks)
    started = time.monotonic()
    base, matrix, per_block = evaluate_blocks(load_base_fp32(path, CPU), experts, blocks)
    full = rank_experts(per_block.base, per_block.experts, bootstrap=args.bootstrap, seed=seed)
    full_seconds = time.monotonic() - started
    full_tokens = evaluation_tokens(len(experts) + 1, len(blocks), args.eval_blocks, args.eval_block_size)
    started = time.monotonic()
    claims = {t.plan.label: [t.claim] for t in trained}
    domains = {t.plan.label: t.plan.domain for t in trained}
    budget = int(BUDGET_FRACTION * full_tokens)
    _, cheap, flagged = rank_claims(base, experts, claims, domains, tokenizer, budget, random.Random(seed))
    cheap_seconds = time.monotonic() - started
    cheap_order = [e.expert for e in cheap.experts]
    agreed = agreement(cheap_order, full.order, cheap.cost_tokens, full_tokens)
    flaws = {t.plan.label: t.plan.flaw for t in trained}
    flawed = {label for label, flaw in flaws.items() if flaw}
    full_rank = {name: i for i, name in enumerate(full.order, start=1)}
    rows = [["expert", "flaw", "full rank", "cheap rank", "cheap score", "own-domain gain", "claims"]]
    for entry in cheap.experts:
        d = domains[entry.expert]
        base_loss, loss = matrix.base.get(d), matrix.experts[entry.expert].get(d)
        own = f"{(base_loss - loss) / base_loss:+.1%}" if base_loss and loss is not None else "n/a"
        rows.append([
            entry.expert, flaws[entry.expert] or "-", str(full_rank[entry.expert]), str(entry.rank),
            f"{entry.score:+.3f}" if entry.score is not None else "-", own,
            flagged.get(entry.expert, "hold")[:60],
        ])  # fmt: skip
    print("\n".join(table_lines(rows, left=(0, 1, 6))), flush=True)
    own_tau = kendall_tau(cheap_order, own_domain_order(matrix, trained, set(flagged)))
    liar = next(label for label, flaw in flaws.items() if flaw == "liar")
    result = {
        "seed": seed,
        "kendall_tau": agreed.kendall_tau,
        "kendall_tau_own_domain": own_tau,
        "top1": agreed.top1,
        "cheap_tokens": cheap.cost_tokens,
        "full_tokens": full_tokens,
        "cheap_cost_ratio": cheap.cost_tokens / full_tokens,
        "cheap_seconds": cheap_seconds,
        "full_seconds": full_seconds,
        "liar_caught": liar in flagged,
        "flawed_last": set(cheap_order[-len(flawed) :]) == flawed,
        "flagged": flagged,
        "full_order": full.order,
        "cheap_order": cheap_order,
        "train_seconds": {t.plan.label: t.seconds for t in trained},
        "evaluation": matrix.model_dump(mode="json"),
    }
    print(
        f"seed {seed}: Kendall tau {agreed.kendall_tau:+.3f} (own-domain {own_tau:+.3f}), top-1 "
        f"{'agrees' if agreed.top1 else 'differs'}, cheap {cheap.cost_tokens} tokens / full {full_tokens} "
        f"({cheap_seconds:.1f} s / {full_seconds:.1f} s)",
        flush=True,
    )
    return result


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None and math.isfinite(v)]
    return sum(found) / len(found) if len(found) == len(values) and found else None


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    path = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(path)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cogen-ranking-"))
    n = len(plans(args, 0))
    print(
        f"ranking: {args.model} ({args.precision}), {n} experts a seed on {', '.join(args.domains)}, "
        f"budgets "
        f"{sorted(args.budgets)} steps of {args.batch_size} x {args.block_size} tokens, seeds {args.seeds}, "
        f"work dir {work}",
        flush=True,
    )
    seeds = [one_seed(args, path, tokenizer, seed, work) for seed in args.seeds]
    report: dict[str, Any] = {
        "kendall_tau": _mean([s["kendall_tau"] for s in seeds]),
        "kendall_tau_own_domain": _mean([s["kendall_tau_own_domain"] for s in seeds]),
        "top1_agreement": sum(s["top1"] for s in seeds) / len(seeds),
        "cheap_cost_ratio": _mean([s["cheap_cost_ratio"] for s in seeds]),
        "liar_caught": all(s["liar_caught"] for s in seeds),
        "flawed_last": all(s["flawed_last"] for s in seeds),
        "bad_source_last": None,  # ranking data sources is not built
        "experts_per_seed": n,
        "seeds": seeds,
        "targets": targets_json(TARGETS),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.monotonic() - started,
    }
    print()
    for key, what in [
        ("kendall_tau", "cheap vs full order, mean over seeds"),
        ("kendall_tau_own_domain", "cheap vs the full evaluation's own-domain order"),
        ("top1_agreement", "seeds whose top experts agree"),
        ("cheap_cost_ratio", "forward-pass tokens, cheap / full"),
    ]:
        print(ratio_line(key, report[key], TARGETS, what, width=24))
    print(f"liar_caught              {report['liar_caught']}   (in every seed)")
    print(f"flawed_last              {report['flawed_last']}   (the four flawed experts last, every seed)")
    print("bad_source_last          not measured   (ranking data sources is not built)")
    print(f"done in {report['seconds']:.0f} s", flush=True)
    write_report(args.json, report)
    return 0


#: what ``--quick`` sets (flags given explicitly still win)
QUICK = {"model": "tiny", "budgets": [6, 18], "seeds": [0], "block_size": 32, "eval_block_size": 32,
         "eval_blocks": 8, "lr": 2e-2, "bootstrap": 50}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__, {"quick": ("smoke test: the tiny model, one seed", QUICK)})
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="base model (smollm2-135m, tiny, a directory)")
    add("--domains", nargs="+", default=["code", "legal", "literature", "medical"], help="at least 2 domains")
    add(
        "--precision", default="fp32", choices=["int8", "bf16", "fp32"], help="training precision of the base"
    )
    add("--optimizer", default="adamw", choices=["adamw", "adamw8bit"], help="the experts' inner optimizer")
    add("--budgets", nargs="+", type=int, default=[8, 24], help="trainer steps of the honest experts")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--batch-size", type=int, default=4)
    add("--block-size", type=int, default=128, help="training block size")
    add("--shards", type=int, default=16, help="the node's data shards (it reads shard 0)")
    add("--lr", type=float, default=2e-3)
    add("--diverged-lr", type=float, default=0.5, help="the diverged expert's learning rate")
    add("--liar-factor", type=float, default=0.5, help="the liar reports its window losses times this")
    add("--warmup-steps", type=int, default=2)
    add("--lora-rank", type=int, default=16)
    add("--eval-blocks", type=int, default=32, help="validation blocks per domain of the full evaluation")
    add("--eval-block-size", type=int, default=128)
    add("--bootstrap", type=int, default=200, help="bootstrap resamples of the full ranking")
    add("--threads", type=int, default=2, help="torch CPU threads")
    add("--work-dir", type=Path, default=None, help="where checkpoints go (default: a new temp dir)")
    args = parse(parser, argv)
    if len(args.domains) < 2 or len(set(args.domains)) != len(args.domains):
        parser.error("--domains needs at least 2 different domains")
    if min(args.budgets) < 1 or min(args.eval_blocks, args.batch_size, args.block_size) < 1:
        parser.error("--budgets, --eval-blocks, --batch-size and --block-size must be positive")
    if not 0 < args.liar_factor < 1:
        parser.error("--liar-factor must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("ranking", lambda: run(args), model_errors=True)


if __name__ == "__main__":
    sys.exit(main())
