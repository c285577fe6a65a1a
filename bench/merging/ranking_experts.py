"""The ranking benchmark's experts: honest ones at two budgets per domain, and four flawed ones.

Every expert is trained as a node trains it (:class:`cogen.node.trainer.ExpertTrainer` on a
:class:`cogen.core.data.TrainStream` of its domain's shard, LoRA on the base; by default an fp32 base
and torch AdamW, which are several times faster on a CPU than the node's 8-bit base and AdamW8bit:
``--precision int8 --optimizer adamw8bit`` trains exactly as a node does), so its prequential claim is
what a node would sign into its progress record
(:meth:`cogen.node.prequential.PrequentialTracker.snapshot` with the node's :class:`StreamSpec`, which
names the expert's domain). The flaws are the ones a swarm meets:

- ``diverged``: the learning rate far too high (``--diverged-lr``);
- ``wrong-data``: a node of one domain whose data directory holds another domain's text (its claim
  still names its own domain, as a node's does);
- ``shuffled``: a corrupted data source: every row's tokens in a random order;
- ``liar``: trained honestly, but it reports its window losses scaled down (``--liar-factor``) to rank
  first.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, latest_checkpoint, save_adapter
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream
from cogen.node.trainer import ExpertTrainer
from cogen.protocols.prequential import LossRun, Prequential, StreamSpec

CPU = torch.device("cpu")
VALIDATION_FRACTION = 0.05  # the node's default


@dataclass(frozen=True)
class Plan:
    """One expert to train: its label, the domain it says it trains, what it really reads, and how."""

    label: str
    domain: str  # the domain it is an expert of (its claims name it)
    data: str  # the domain whose text it really reads
    steps: int
    lr: float
    flaw: str | None = None  # None, "diverged", "wrong-data", "shuffled", "liar"


@dataclass(frozen=True)
class Trained:
    plan: Plan
    checkpoint: Path
    claim: Prequential  # what it reports (the liar's is forged)
    seconds: float


def plans(args: argparse.Namespace, seed: int) -> list[Plan]:
    """Every domain at every budget, then the four flawed experts on domains that rotate with the seed."""
    domains, short = list(args.domains), min(args.budgets)
    found = [Plan(f"{d}-{steps}", d, d, steps, args.lr) for d in domains for steps in sorted(args.budgets)]
    turn = [domains[(seed + i) % len(domains)] for i in range(4)]
    other = domains[(seed + 1 + len(domains) // 2) % len(domains)]
    if other == turn[1]:
        other = domains[(domains.index(turn[1]) + 1) % len(domains)]
    found += [
        Plan(f"diverged-{turn[0]}", turn[0], turn[0], short, args.diverged_lr, "diverged"),
        Plan(f"wrong-data-{turn[1]}", turn[1], other, short, args.lr, "wrong-data"),
        Plan(f"shuffled-{turn[2]}", turn[2], turn[2], short, args.lr, "shuffled"),
        Plan(f"liar-{turn[3]}", turn[3], turn[3], short, args.lr, "liar"),
    ]
    return found


def spec(args: argparse.Namespace, domain: str, seed: int) -> StreamSpec:
    """The stream a node of ``domain`` reads (shard 0 of ``--shards``), as its claims name it."""
    return StreamSpec(
        corpus=domain, shard=0, num_shards=args.shards, seed=seed, block_size=args.block_size,
        batch_size=args.batch_size, validation_fraction=VALIDATION_FRACTION,
    )  # fmt: skip


def _stream(args: argparse.Namespace, tokenizer: Any, plan: Plan, seed: int) -> Iterator[torch.Tensor]:
    s = spec(args, plan.data, seed)
    stream = TrainStream(
        get_corpus(s.corpus), tokenizer, block_size=s.block_size, batch_size=s.batch_size, shard=s.shard,
        num_shards=s.num_shards, seed=s.seed, validation_fraction=s.validation_fraction,
    )  # fmt: skip
    if plan.flaw != "shuffled":
        yield from stream
        return
    rng = torch.Generator().manual_seed(seed)
    for batch in stream:
        yield torch.stack([row[torch.randperm(row.numel(), generator=rng)] for row in batch])


def _forge(claim: Prequential, factor: float) -> Prequential:
    """The liar's claim: its window losses scaled down (its base claim left as it was)."""
    window = LossRun(
        start=claim.window.start, rows=[[r * factor for r in rows] for rows in claim.window.rows]
    )
    return claim.model_copy(update={"window": window})


def train(args: argparse.Namespace, path: str, tokenizer: Any, plan: Plan, seed: int, out: Path) -> Trained:
    """Train ``plan``'s expert from the base; its checkpoint and its (possibly forged) claim."""
    torch.manual_seed(seed)
    model = models.add_lora(
        models.load_base(path, args.precision, CPU), ModelConfig(lora_rank=args.lora_rank), seed=seed
    )
    ocfg = OptimConfig(optimizer=args.optimizer, lr=plan.lr, warmup_steps=args.warmup_steps)
    optimizer = models.build_optimizer(models.trainable_parameters(model), ocfg)
    trainer = ExpertTrainer(
        model,
        optimizer,
        models.warmup_schedule(optimizer, ocfg.warmup_steps),
        _stream(args, tokenizer, plan, seed),
    )
    started, last = time.monotonic(), 0.0
    for _ in range(plan.steps):
        last = trainer.step().loss
    seconds = time.monotonic() - started
    print(f"  {plan.label}: {plan.steps} steps, last loss {last:.3f} ({seconds:.0f} s)", flush=True)
    claim = trainer.prequential.snapshot(0, spec(args, plan.domain, seed))
    if claim is None:
        raise RuntimeError(f"{plan.label}: no finite loss in {plan.steps} steps")
    if plan.flaw == "liar":
        claim = _forge(claim, args.liar_factor)
    meta = AdapterMetadata(
        expert=plan.label, base_model=args.model, precision=args.precision, steps=trainer.steps,
        samples=trainer.samples, tokens=trainer.tokens, train_loss=last,
    )  # fmt: skip
    save_adapter(model, out / plan.label, meta)
    ckpt = latest_checkpoint(out / plan.label)
    assert ckpt is not None
    return Trained(plan, ckpt, claim, seconds)
