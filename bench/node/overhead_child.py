"""One configuration of the node-overhead benchmark, built and measured in its own fresh process.

``python -m bench.node.overhead --worker NAME`` runs :func:`run_worker` here: it builds the configuration
(cogen's node step, the hand-written floor, or an fp32 reference), times its steps and measures its
memory; one process per configuration because peak RSS is a per-process figure.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cogen.core import models
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.telemetry import current_memory_bytes, model_state_bytes, peak_memory_bytes

from ..harness import BenchError

DESCRIPTIONS = {
    "cogen": "8-bit base + LoRA + AdamW8bit, cogen's ExpertTrainer.step (what a node runs)",
    "bare_int8_lora": "8-bit base + LoRA + AdamW8bit, hand-written transformers + PEFT loop (the floor)",
    "fp32_full": "fp32, all parameters trainable, torch AdamW (the memory baseline)",
    "fp32_lora": "fp32 base + LoRA + torch AdamW (context)",
}


@dataclass
class Setup:
    """One configuration, built: its model and optimizer, and a function that runs one step on a batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor], torch.Tensor]  # returns the (detached) loss
    gradient_checkpointing: bool


def _schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The node's schedule written out (linear warm-up, then constant) for the loops without cogen."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def _plain_setup(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ocfg: OptimConfig, gradient_checkpointing: bool
) -> Setup:
    """A configuration without cogen: the node's schedule and step written out by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = _schedule(optimizer, ocfg.warmup_steps)
    model.train()

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ocfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Setup(model, optimizer, step, gradient_checkpointing)


def _lora_config(mcfg: ModelConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=mcfg.lora_rank,
        lora_alpha=mcfg.lora_alpha,
        lora_dropout=mcfg.lora_dropout,
        target_modules=list(mcfg.lora_targets),
        task_type="CAUSAL_LM",
    )


def build_cogen(path: str, mcfg: ModelConfig, ocfg: OptimConfig, batches: list[torch.Tensor]) -> Setup:
    """Exactly what ``cogen-node`` builds (node/service.py), stepping through ``ExpertTrainer``."""
    from cogen.node.trainer import ExpertTrainer

    base = models.load_base(path, "int8", torch.device("cpu"))
    model = models.add_lora(base, mcfg, seed=0)
    optimizer = models.build_optimizer(models.trainable_parameters(model), ocfg)
    scheduler = models.warmup_schedule(optimizer, ocfg.warmup_steps)
    feed: list[torch.Tensor] = []  # the trainer pulls each step's batch from here
    trainer = ExpertTrainer(model, optimizer, scheduler, _feed(feed), max_grad_norm=ocfg.max_grad_norm)

    def step(batch: torch.Tensor) -> torch.Tensor:
        feed.append(batch)
        stats = trainer.step()
        if not stats.applied:
            raise BenchError(f"cogen: non-finite loss {stats.loss}; the update was skipped")
        return torch.tensor(stats.loss)

    return Setup(model, optimizer, step, mcfg.gradient_checkpointing)


def _feed(items: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """An endless iterator over a list that the benchmark fills one batch before each step."""
    while True:
        yield items.pop(0)


def build_bare_int8_lora(path: str, mcfg: ModelConfig, ocfg: OptimConfig, _: list[torch.Tensor]) -> Setup:
    """The floor: the same 8-bit base, LoRA and optimizer, with transformers, PEFT and bitsandbytes only."""
    import bitsandbytes as bnb
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=mcfg.gradient_checkpointing)
    torch.manual_seed(0)
    model = get_peft_model(model, _lora_config(mcfg))
    params = [p for p in model.parameters() if p.requires_grad]
    # min_8bit_size=0 as in cogen: 8-bit states even for small adapter matrices (the same optimizer)
    optimizer = bnb.optim.AdamW8bit(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay, min_8bit_size=0)
    return _plain_setup(model, optimizer, ocfg, mcfg.gradient_checkpointing)


def _fp32_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def build_fp32_full(path: str, mcfg: ModelConfig, ocfg: OptimConfig, _: list[torch.Tensor]) -> Setup:
    """The memory baseline: plain fp32 full fine-tuning (no gradient checkpointing), torch AdamW."""
    model = _fp32_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
    return _plain_setup(model, optimizer, ocfg, False)


def build_fp32_lora(path: str, mcfg: ModelConfig, ocfg: OptimConfig, _: list[torch.Tensor]) -> Setup:
    """Context: the same LoRA on an fp32 base, torch AdamW (32-bit states)."""
    from peft import get_peft_model

    model = _fp32_model(path)
    for p in model.parameters():
        p.requires_grad_(False)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, _lora_config(mcfg))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay)
    return _plain_setup(model, optimizer, ocfg, mcfg.gradient_checkpointing)


BUILDERS: dict[str, Callable[[str, ModelConfig, OptimConfig, list[torch.Tensor]], Setup]] = {
    "cogen": build_cogen,
    "bare_int8_lora": build_bare_int8_lora,
    "fp32_full": build_fp32_full,
    "fp32_lora": build_fp32_lora,
}


def _unique_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer state counting each storage once (bitsandbytes shares its quantile maps between params)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for per_param in optimizer.state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor) and (v.data_ptr(), v.nbytes) not in seen:
                seen.add((v.data_ptr(), v.nbytes))
                total += v.nbytes
    return total


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one configuration in this (fresh) process, time its steps, measure its memory."""
    # the whole training stack is imported before the baseline, in every configuration alike
    import bitsandbytes
    import peft
    import transformers
    from safetensors.torch import load_file

    import cogen.node.trainer  # noqa: F401

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stacked = load_file(args.batches)["input_ids"]
    batches = [stacked[i].clone() for i in range(stacked.shape[0])]
    del stacked
    baseline = current_memory_bytes()

    mcfg = ModelConfig(model=args.model, gradient_checkpointing=args.gradient_checkpointing)
    ocfg = OptimConfig()
    start = time.perf_counter()
    setup = BUILDERS[name](args.model_path, mcfg, ocfg, batches)
    load_s = time.perf_counter() - start
    after_load = current_memory_bytes()

    times: list[float] = []
    losses: list[float] = []
    total = args.warmup + args.steps
    for i, batch in enumerate(batches[:total]):
        t0 = time.perf_counter()
        loss = setup.step(batch)
        seconds = time.perf_counter() - t0
        losses.append(float(loss))
        phase = "warm-up" if i < args.warmup else "measured"
        if i >= args.warmup:
            times.append(seconds)
        print(
            f"    {name} step {i + 1}/{total} ({phase}): {seconds:.2f} s, loss {losses[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
    if not all(math.isfinite(x) for x in losses):
        raise BenchError(f"{name}: non-finite loss in {losses}")

    state = model_state_bytes(setup.model, setup.optimizer)
    peak = peak_memory_bytes()
    median = statistics.median(times)
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    return {
        "description": DESCRIPTIONS[name],
        "gradient_checkpointing": setup.gradient_checkpointing,
        "optimizer": f"{type(setup.optimizer).__module__}.{type(setup.optimizer).__name__}",
        "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "load_seconds": load_s,
        "step_seconds": times,
        "median_step_seconds": median,
        "samples_per_second": batches[0].shape[0] / median,
        "tokens_per_second": batches[0].numel() / median,
        "losses": losses,
        "state_bytes": state,
        "optimizer_state_bytes_unique": _unique_optimizer_bytes(setup.optimizer),
        "baseline_rss_bytes": baseline,
        "rss_after_load_bytes": after_load,
        "peak_rss_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
