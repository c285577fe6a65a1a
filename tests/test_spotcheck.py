"""Spot-checks of prequential claims: an honest node's hold, a liar's do not, and the liar ranks last."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cogen.coordinator.merging.merge import load_base_fp32
from cogen.coordinator.merging.prequential import cheap_weights, estimate, prequential_ranking
from cogen.coordinator.merging.spotcheck import check_expert, rebuild_batch
from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, save_adapter
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.node.trainer import ExpertTrainer
from cogen.protocols.prequential import LossRun, Prequential, StreamSpec

CPU = torch.device("cpu")
SPEC = StreamSpec(corpus="medical", shard=0, num_shards=2, seed=3, block_size=32, batch_size=2,
                  validation_fraction=0.05)  # fmt: skip
STEPS = 24


def node_stream(tiny_path: str) -> Iterator[torch.Tensor]:
    return train_batches(
        get_corpus(SPEC.corpus), models.load_tokenizer(tiny_path), block_size=SPEC.block_size,
        batch_size=SPEC.batch_size, shard=SPEC.shard, num_shards=SPEC.num_shards, seed=SPEC.seed,
        validation_fraction=SPEC.validation_fraction,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Prequential]:
    """A tiny expert trained on SPEC's stream (its honest claims) and saved as a checkpoint."""
    model = models.add_lora(models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4))
    optimizer = models.build_optimizer(
        models.trainable_parameters(model), OptimConfig(optimizer="adamw", lr=1e-2)
    )
    stream = node_stream(tiny_path)
    trainer = ExpertTrainer(model, optimizer, models.warmup_schedule(optimizer, 1), stream)
    for _ in range(STEPS):
        trainer.step()
    claim = trainer.prequential.snapshot(0, SPEC)
    assert claim is not None and claim.base is not None
    meta = AdapterMetadata(expert="medical", base_model=tiny_path, precision="fp32", steps=STEPS,
                           samples=2 * STEPS, tokens=64 * STEPS)  # fmt: skip
    return save_adapter(model, tmp_path_factory.mktemp("expert"), meta), claim


def forged(claim: Prequential, window: float | None = None, base: float | None = None) -> Prequential:
    update = {}
    if window is not None:
        update["window"] = LossRun(
            start=claim.window.start, rows=[[window] * len(r) for r in claim.window.rows]
        )
    if base is not None and claim.base is not None:
        update["base"] = LossRun(start=claim.base.start, rows=[[base] * len(r) for r in claim.base.rows])
    return claim.model_copy(update=update)


def scaled(claim: Prequential, factor: float) -> Prequential:
    """A subtler liar: every window row's loss shaved by the same factor (batch means stay consistent)."""
    rows = [[r * factor for r in batch] for batch in claim.window.rows]
    return claim.model_copy(update={"window": LossRun(start=claim.window.start, rows=rows)})


def test_a_liar_shaving_a_tenth_off_its_rows_is_caught_wherever_the_check_lands(
    tiny_path: str, trained: tuple[Path, Prequential]
) -> None:
    """The check compares the very rows it recomputes, so the slack is the precision gap (5 %), not the
    spread between a row and its batch's mean: a liar 10 % low is caught by every check."""
    path, honest = trained
    base = load_base_fp32(tiny_path, CPU)
    tokenizer = models.load_tokenizer(tiny_path)
    for seed in range(4):
        for budget in (SPEC.block_size, 2 * SPEC.batch_size * SPEC.block_size):  # one row, or whole batches
            base, result = check_expert(base, path, [scaled(honest, 0.9)], tokenizer, budget,
                                        random.Random(seed))  # fmt: skip
            assert result.failed is not None and "claimed a loss" in result.failed, (seed, budget, result)
            base, fine = check_expert(base, path, [honest], tokenizer, budget, random.Random(seed))
            assert fine.failed is None, (seed, budget, fine)


def test_the_rebuilt_batch_is_the_one_the_node_read(tiny_path: str) -> None:
    stream = node_stream(tiny_path)
    read = [next(stream) for _ in range(6)]
    assert torch.equal(rebuild_batch(SPEC, models.load_tokenizer(tiny_path), 5), read[5])


def test_honest_claims_hold_and_fake_ones_are_caught(
    tiny_path: str, trained: tuple[Path, Prequential]
) -> None:
    path, honest = trained
    base = load_base_fp32(tiny_path, CPU)
    tokenizer = models.load_tokenizer(tiny_path)
    budget = 2 * SPEC.batch_size * SPEC.block_size  # room for one whole window batch and the base batch
    for seed in range(3):  # whichever batch the coordinator picks
        base, result = check_expert(base, path, [honest], tokenizer, budget, random.Random(seed))
        assert result.failed is None and result.checked == 2 and result.tokens == budget, result
    base, low = check_expert(base, path, [forged(honest, window=0.05)], tokenizer, budget, random.Random(0))
    assert low.failed is not None and "claimed a loss of 0.050" in low.failed
    high_base = forged(honest, base=honest.base.losses[0] * 2 if honest.base else 1.0)
    base, inflated = check_expert(base, path, [high_base], tokenizer, budget, random.Random(0))
    assert inflated.failed is not None and "base" in inflated.failed
    # within a budget of one row per check, it still checks (and still catches the liar)
    small = 2 * SPEC.block_size
    base, partial = check_expert(
        base, path, [forged(honest, window=0.05)], tokenizer, small, random.Random(1)
    )
    assert partial.failed is not None and partial.tokens == small
    # a budget smaller than one row (small evaluation settings) still checks one row per claim, counted
    base, tight = check_expert(
        base, path, [forged(honest, window=0.05)], tokenizer, SPEC.block_size - 1, random.Random(0)
    )
    assert tight.checked == 2 and tight.tokens == 2 * SPEC.block_size and tight.failed is not None
    # the liar's fake claim would put it first; caught, it goes last and weighs nothing
    estimates = {
        "honest": estimate("honest", [honest]),
        "liar": estimate("liar", [forged(honest, window=0.05)]),
    }
    assert prequential_ranking(estimates).experts[0].expert == "liar"
    ranked = prequential_ranking(estimates, flagged={"liar": low.failed})
    assert [e.expert for e in ranked.experts] == ["honest", "liar"] and cheap_weights(ranked)["liar"] == 0
