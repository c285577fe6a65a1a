"""The communication benchmark's settings, model, data and a worker's inner steps.

Every arm builds the same seeded Llama over a folded vocabulary and steps it with cogen's own inner
optimizer and schedule; ``scaling.py`` trains its groups with the same pieces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cogen.core import models
from cogen.core.config import GroupConfig, OptimConfig

from ..harness import BenchError

GROUP_DEFAULTS = GroupConfig()


@dataclass(frozen=True)
class Settings:
    """Everything one run depends on; the defaults are cogen's ``GroupConfig`` for the outer step."""

    workers: int = 2  # simulated members of the group
    steps: int = 1000  # inner steps per worker (the token budget: steps x workers x batch x block)
    inner_steps: int = GROUP_DEFAULTS.inner_steps  # H
    outer_lr: float = GROUP_DEFAULTS.outer_lr
    outer_momentum: float = GROUP_DEFAULTS.outer_momentum
    outer_lr_warmup: int = 0  # rounds of linear outer-lr warm-up (0: none)
    h_start: int = 0  # H of the first round, doubling each round up to inner_steps (0: constant H)
    compression: str = GROUP_DEFAULTS.compression
    threshold: int = GROUP_DEFAULTS.compression_threshold
    vocab: int = 1024  # token ids are folded modulo this
    hidden: int = 96
    layers: int = 2
    intermediate: int = 256
    block_size: int = 64
    batch_size: int = 8
    lr: float = 3e-3  # inner AdamW peak learning rate (both arms)
    warmup_steps: int = 20  # inner linear warm-up (both arms)
    optimizer: str = "adamw"  # inner optimizer: adamw (torch) or adamw8bit (bitsandbytes)
    max_grad_norm: float = OptimConfig().max_grad_norm
    domain: str = "medical"
    shuffle_blocks: bool = True  # mix each worker's blocks (see load_data)
    eval_blocks: int = 256  # validation blocks (16k tokens at 64): a broad set, as the curve follows the data
    threads: int = 1
    seed: int = 0


def build_model(s: Settings) -> torch.nn.Module:
    """A randomly initialised, seeded Llama over the folded vocabulary; every weight trainable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(256, s.block_size), tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.train()
    return model


@dataclass
class Data:
    """Each worker's batches for the whole run (tokenised once, up front) and the validation blocks."""

    shards: list[list[torch.Tensor]]
    validation: torch.Tensor


def load_data(s: Settings, steps_per_worker: int, workers: int) -> Data:
    """Tokenise ``steps_per_worker`` batches of each worker's shard, folded into the small vocabulary."""
    from cogen.core.corpora import get_corpus
    from cogen.core.data import gpt2_tokenizer, train_batches, validation_blocks

    tokenizer = gpt2_tokenizer()
    try:
        corpus = get_corpus(s.domain)
        shards = []
        for i in range(workers):
            stream = train_batches(
                corpus, tokenizer, block_size=s.block_size, batch_size=s.batch_size, shard=i,
                num_shards=workers, seed=s.seed,
            )  # fmt: skip
            batches = [next(stream) % s.vocab for _ in range(steps_per_worker)]
            shards.append(_shuffled(batches, s.seed * 1000 + i) if s.shuffle_blocks else batches)
        validation = validation_blocks(corpus, tokenizer, block_size=s.block_size, max_blocks=s.eval_blocks)
    except (ValueError, OSError) as e:
        raise BenchError(f"cannot read domain {s.domain!r}: {e}") from None
    return Data(shards, validation % s.vocab)


def _shuffled(batches: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The same blocks in a seeded random order: a shard streams its documents one after another, and
    some are long, so without this a few consecutive batches share one topic and the validation loss
    swings with it; mixed, the curves are smooth enough to compare two arms at one point."""
    blocks = torch.cat(batches)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return list(blocks[order].split(batches[0].shape[0]))


class Worker:
    """One worker's model, inner optimizer and schedule (cogen's builders), stepping on given batches."""

    def __init__(self, s: Settings):
        self.model = build_model(s)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        ocfg = OptimConfig(optimizer=s.optimizer, lr=s.lr, warmup_steps=s.warmup_steps)  # type: ignore[arg-type]
        self.optimizer = models.build_optimizer(self.params, ocfg)
        self.scheduler = models.warmup_schedule(self.optimizer, s.warmup_steps)
        self.max_grad_norm = s.max_grad_norm
        self.seconds = 0.0  # CPU time of this worker's inner steps (robust to other load on the machine)

    def step(self, batches: Sequence[torch.Tensor]) -> float:
        """One inner step (as ``ExpertTrainer.step``). With several batches (the data-parallel baseline),
        their gradients are averaged in fp32 before clipping and the optimizer step."""
        start = time.process_time()
        total = 0.0
        for batch in batches:
            loss = self.model(input_ids=batch, labels=batch).loss
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.process_time() - start
        return total


def evaluate(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Validation loss (nats per token) with cogen's evaluation."""
    from cogen.core.evaluation import validation_loss

    return validation_loss(model, blocks, batch_size=32)
