"""Adapter checkpoints: round trip, integrity checks, atomic replacement, metadata upgrades."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogen.core import models
from cogen.core.checkpoint import (
    AdapterMetadata,
    CheckpointError,
    latest_checkpoint,
    load_adapter,
    read_metadata,
    save_adapter,
)
from cogen.core.config import ModelConfig

CPU = torch.device("cpu")


def _trained_adapter(tiny_path: str, seed: int) -> torch.nn.Module:
    model = models.add_lora(models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4), seed=seed)
    with torch.no_grad():
        for p in models.trainable_parameters(model):
            p.add_(torch.randn_like(p))  # LoRA's B starts at zero: make the adapter non-trivial
    return model


def _meta(steps: int) -> AdapterMetadata:
    return AdapterMetadata(
        expert="medical", base_model="tiny", precision="fp32", steps=steps, samples=8, tokens=256
    )


def test_round_trip_restores_the_adapter(tmp_path: Path, tiny_path: str) -> None:
    model = _trained_adapter(tiny_path, 1)
    ckpt = save_adapter(model, tmp_path, _meta(5))
    assert latest_checkpoint(tmp_path) == ckpt
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "cogen.json",
    ]
    restored = load_adapter(models.load_base(tiny_path, "fp32", CPU), ckpt)
    batch = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=batch).logits, restored(input_ids=batch).logits, atol=1e-5)
    meta = read_metadata(ckpt)
    assert meta.steps == 5 and set(meta.files) == {"adapter_config.json", "adapter_model.safetensors"}


def test_tampered_or_partial_checkpoints_are_refused(tmp_path: Path, tiny_path: str) -> None:
    ckpt = save_adapter(_trained_adapter(tiny_path, 1), tmp_path, _meta(1))
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CheckpointError, match="sha256"):
        load_adapter(models.load_base(tiny_path, "fp32", CPU), ckpt)
    (ckpt / "cogen.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_metadata(ckpt)
    with pytest.raises(CheckpointError, match="not a cogen checkpoint"):
        read_metadata(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_checkpoint_in_place(tmp_path: Path, tiny_path: str) -> None:
    model = _trained_adapter(tiny_path, 1)
    first = save_adapter(model, tmp_path, _meta(1))

    class Exploding:
        def save_pretrained(self, path: Path, **kwargs: object) -> None:
            model.save_pretrained(path, **kwargs)  # write real files, then die before the rename
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_adapter(Exploding(), tmp_path, _meta(2))
    assert latest_checkpoint(tmp_path) == first
    read_metadata(first, verify=True)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no half-written leftovers


def test_old_checkpoints_are_pruned_within_their_generation(tmp_path: Path, tiny_path: str) -> None:
    model = _trained_adapter(tiny_path, 1)
    for step in range(1, 6):
        save_adapter(model, tmp_path, _meta(step), keep=2)
    # the next generation's expert at the same step count neither overwrites nor prunes generation 0's
    for step in range(4, 8):
        save_adapter(model, tmp_path, _meta(step).model_copy(update={"generation": 1}), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "gen-000000-step-00000004", "gen-000000-step-00000005",
        "gen-000001-step-00000006", "gen-000001-step-00000007",
    ]  # fmt: skip
    assert read_metadata(tmp_path / "checkpoints" / "gen-000000-step-00000005").generation == 0
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "gen-000001-step-00000007"


def test_old_metadata_is_upgraded_and_newer_is_refused(tmp_path: Path, tiny_path: str) -> None:
    ckpt = save_adapter(_trained_adapter(tiny_path, 1), tmp_path, _meta(3))
    raw = json.loads((ckpt / "cogen.json").read_text())
    dropped = ("metadata_version", "train_loss", "files", "generation")
    old = {k: v for k, v in raw.items() if k not in dropped} | {"loss": 2.5}
    (ckpt / "cogen.json").write_text(json.dumps(old))
    meta = read_metadata(ckpt, verify=False)
    assert meta.metadata_version == 2 and meta.train_loss == 2.5 and meta.generation == 0
    v1 = {k: v for k, v in raw.items() if k != "generation"} | {"metadata_version": 1}
    (ckpt / "cogen.json").write_text(json.dumps(v1 | {"base_model": "/bases/gen-000003-0123456789abcdef"}))
    assert read_metadata(ckpt, verify=False).generation == 3  # v1 knew its generation only by the base's path
    (ckpt / "cogen.json").write_text(json.dumps(raw | {"metadata_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        read_metadata(ckpt, verify=False)
