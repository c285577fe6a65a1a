"""Expert checkpoints for the merging tests: seeded LoRA adapters on the tiny model, saved for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cogen.coordinator.config import MergeConfig
from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, save_adapter
from cogen.core.config import ModelConfig
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
