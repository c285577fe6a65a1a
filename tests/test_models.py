"""8-bit base + LoRA + 8-bit optimizer on the tiny model: real bitsandbytes layers, real training."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from cogen.core import models
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.evaluation import validation_loss
from cogen.core.telemetry import model_state_bytes
from cogen.node.trainer import ExpertTrainer

CPU = torch.device("cpu")


def test_int8_base_uses_bitsandbytes_layers_and_lora_trains_only_adapters(tiny_path: str) -> None:
    base = models.load_base(tiny_path, "int8", CPU)
    int8 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(m.weight.dtype == torch.int8 for m in int8)
    model = models.add_lora(base, ModelConfig(lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_initialisation_is_seeded(tiny_path: str) -> None:
    def adapters(seed: int) -> list[torch.Tensor]:
        model = models.add_lora(models.load_base(tiny_path, "int8", CPU), ModelConfig(lora_rank=4), seed=seed)
        return [p.detach().clone() for p in models.trainable_parameters(model)]

    same, other = adapters(1), adapters(2)
    assert all(torch.equal(a, b) for a, b in zip(same, adapters(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other, strict=True))


def test_8bit_model_lora_and_8bit_optimizer_reduce_the_loss(tiny_path: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(lora_rank=8, lora_targets=(*ModelConfig().lora_targets, "lm_head"))
    model = models.add_lora(models.load_base(tiny_path, "int8", CPU), cfg)
    optimizer = models.build_optimizer(models.trainable_parameters(model), OptimConfig(lr=1e-2))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    scheduler = models.warmup_schedule(optimizer, 1)
    batch = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(0))
    before = validation_loss(model, batch)
    trainer = ExpertTrainer(model, optimizer, scheduler, iter([batch] * 15))
    for _ in range(15):
        stats = trainer.step()
        assert stats.applied
    after = validation_loss(model, batch)
    assert after < before - 1.0, (before, after)
    assert trainer.tokens == 15 * 4 * 32
    # the optimizer state really is 8-bit: uint8 moments with per-block scales
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)


def test_model_state_of_8bit_lora_is_far_below_fp32_full_finetuning(tiny_path: str) -> None:
    lora = models.add_lora(models.load_base(tiny_path, "int8", CPU), ModelConfig(lora_rank=8))
    lora_opt = models.build_optimizer(models.trainable_parameters(lora), OptimConfig())
    full = models.load_base(tiny_path, "fp32", CPU)
    for p in full.parameters():
        p.requires_grad_(True)
    full_opt = torch.optim.AdamW(full.parameters())
    batch = torch.randint(0, 50257, (2, 16))
    for model, opt in ((lora, lora_opt), (full, full_opt)):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    cogen, baseline = model_state_bytes(lora, lora_opt), model_state_bytes(full, full_opt)
    assert cogen["optimizer"] < baseline["optimizer"] / 50
    assert cogen["gradients"] < baseline["gradients"] / 10
    assert cogen["total"] < baseline["total"] / 2  # the 50k-token embedding stays fp32 in both


def test_non_finite_loss_skips_the_update(tiny_path: str) -> None:
    model = models.add_lora(models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4))
    params = models.trainable_parameters(model)
    optimizer = models.build_optimizer(params, OptimConfig(optimizer="adamw"))
    before = [p.detach().clone() for p in params]
    lm_head = model.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    trainer = ExpertTrainer(
        model, optimizer, models.warmup_schedule(optimizer, 1), iter([torch.ones(1, 8).long()])
    )
    stats = trainer.step()
    handle.remove()
    assert not stats.applied and trainer.skipped == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_model_names_resolve_with_clear_errors(tmp_path: Path, tiny_path: str) -> None:
    assert models.resolve_model("tiny") == tiny_path  # built once, then reused
    assert models.resolve_model(tiny_path) == tiny_path
    with pytest.raises(models.ModelError, match=r"no config\.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve_model("./no-such-model")
    with pytest.raises(models.ModelError, match="no CUDA GPU") if not torch.cuda.is_available() else _noop():
        models.resolve_device("cuda")


class _noop:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_training_on_gpu(tiny_path: str) -> None:
    cuda = torch.device("cuda")
    model = models.add_lora(models.load_base(tiny_path, "int8", cuda), ModelConfig(lora_rank=4))
    optimizer = models.build_optimizer(models.trainable_parameters(model), OptimConfig(lr=1e-2))
    batch = torch.randint(0, 50257, (2, 32), device=cuda)
    trainer = ExpertTrainer(model, optimizer, models.warmup_schedule(optimizer, 1), iter([batch] * 5))
    losses = [trainer.step().loss for _ in range(5)]
    assert losses[-1] < losses[0]
