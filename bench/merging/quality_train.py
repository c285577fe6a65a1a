"""The quality benchmark's models: one LoRA per domain and one centralised LoRA, trained as a node trains.

Each is trained with cogen's own trainer (:class:`cogen.node.trainer.ExpertTrainer`, the step a node
runs) on the CPU; the centralised model's batches cycle through the domains (:func:`round_robin`), so it
sees their union in equal parts with the same total number of tokens.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, latest_checkpoint, save_adapter
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.node.trainer import ExpertTrainer

CPU = torch.device("cpu")


def round_robin(streams: list[Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
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
        model, optimizer, models.warmup_schedule(optimizer, ocfg.warmup_steps), round_robin(streams)
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
