"""Expert checkpoints for the merging tests: seeded LoRA adapters on the tiny model, saved for real."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.config import MergeConfig
from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, save_adapter
from cogen.core.config import ModelConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream
from cogen.core.settings import build_config

CPU = torch.device("cpu")


def merge_config(**settings: Any) -> MergeConfig:
    """An offline merge's config from flat settings, by flag name (``method="ties"``, ``identity=...``)."""
    return build_config(MergeConfig, environ={}, **settings)


def make_expert(
    tiny_path: str,
    out_dir: Path,
    seed: int,
    *,
    expert: str = "medical",
    base_model: str = "tiny",
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    std: float = 0.05,
) -> Path:
    """A LoRA adapter on the tiny model with seeded random A and B, saved as a cogen checkpoint."""
    model = models.add_lora(
        models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4, lora_targets=targets), seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    meta = AdapterMetadata(
        expert=expert, base_model=base_model, precision="fp32", steps=3, samples=12, tokens=384
    )
    save_adapter(model, out_dir, meta)
    return out_dir


def trained_expert(
    tiny_path: str,
    out: Path,
    domain: str,
    steps: int = 30,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
) -> Path:
    """A LoRA expert really trained on ``domain`` (AdamW, a few dozen steps of the tiny model)."""
    torch.manual_seed(0)
    model = models.add_lora(
        models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4, lora_targets=targets), seed=0
    )
    tokenizer = models.load_tokenizer(tiny_path)
    stream = TrainStream(get_corpus(domain), tokenizer, block_size=64, batch_size=8, shard=0, num_shards=1)
    optimizer = torch.optim.AdamW(models.trainable_parameters(model), lr=2e-2)
    model.train()
    for batch in itertools.islice(iter(stream), steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    meta = AdapterMetadata(expert=domain, base_model="tiny", precision="fp32", steps=steps, samples=8 * steps,
                           tokens=512 * steps)  # fmt: skip
    save_adapter(model, out, meta)
    return out


def two_experts(tiny_path: str, root: Path) -> list[Path]:
    """A medical and a legal expert with seeded random adapters (:func:`make_expert`)."""
    return [
        make_expert(tiny_path, root / "medical", 1, expert="medical"),
        make_expert(tiny_path, root / "legal", 2, expert="legal"),
    ]


def cfg(tmp_path: Path, experts: list[Path], **kw: object) -> MergeConfig:
    """An offline merge of ``experts`` into ``tmp_path/out``, signed with ``tmp_path/id.pem``, on CPU."""
    settings = {"experts": experts, "out": tmp_path / "out", "identity": tmp_path / "id.pem", "device": "cpu"}
    return merge_config(**{**settings, **kw})
