"""What a ``cogen-node`` training step costs, and what its 8-bit method saves in memory.

Throughput: samples/s of the exact step a node runs (``ExpertTrainer.step`` on an 8-bit base with LoRA
adapters and bitsandbytes AdamW8bit) against the floor, a hand-written transformers + PEFT loop on the
same 8-bit base, LoRA config, optimizer, batches and thread count.

Memory: the node's method against fp32 full fine-tuning (all weights trainable, torch AdamW), both as
model-state bytes (weights + gradients + optimizer state, ``cogen.telemetry.model_state_bytes``) and as
the measured peak resident set size of the process.

Every configuration runs in a fresh child process (this script with ``--worker NAME``), one after
another, because peak RSS is a per-process figure. The batches are tokenised once, up front, by
``cogen.data.train_batches`` and handed to every child, so no configuration times tokenisation.

Run ``python bench/node_overhead.py --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogen import models
from cogen.config import DataConfig, ModelConfig, OptimConfig
from cogen.telemetry import current_memory_bytes, format_bytes, model_state_bytes, peak_memory_bytes

logger = logging.getLogger("cogen.bench.node_overhead")

RESULT_PREFIX = "COGEN_BENCH_RESULT "
TARGETS = {
    "throughput_ratio": (">=", 0.97),
    "state_memory_ratio": ("<=", 0.25),
    "peak_memory_ratio": ("<=", 0.5),
}
DESCRIPTIONS = {
    "cogen": "8-bit base + LoRA + AdamW8bit, cogen's ExpertTrainer.step (what a node runs)",
    "bare_int8_lora": "8-bit base + LoRA + AdamW8bit, hand-written transformers + PEFT loop (the floor)",
    "fp32_full": "fp32, all parameters trainable, torch AdamW (the memory baseline)",
    "fp32_lora": "fp32 base + LoRA + torch AdamW (context)",
}
REQUIRED = ("cogen", "bare_int8_lora", "fp32_full")


class BenchError(RuntimeError):
    """A configuration failed to run (one-line explanation)."""


# ----------------------------------------------------------------- the child: one configuration


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


def _plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


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
    trainer = ExpertTrainer(model, optimizer, scheduler, _Feed(feed), max_grad_norm=ocfg.max_grad_norm)

    def step(batch: torch.Tensor) -> torch.Tensor:
        feed.append(batch)
        stats = trainer.step()
        if not stats.applied:
            raise BenchError(f"cogen: non-finite loss {stats.loss}; the update was skipped")
        return torch.tensor(stats.loss)

    return Setup(model, optimizer, step, mcfg.gradient_checkpointing)


class _Feed:
    """An iterator over a list that the benchmark fills one batch before each step."""

    def __init__(self, items: list[torch.Tensor]):
        self.items = items

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> torch.Tensor:
        return self.items.pop(0)


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
    scheduler = _schedule(optimizer, ocfg.warmup_steps)
    return Setup(
        model,
        optimizer,
        _plain_step(model, optimizer, scheduler, ocfg.max_grad_norm),
        mcfg.gradient_checkpointing,
    )


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
    scheduler = _schedule(optimizer, ocfg.warmup_steps)
    return Setup(model, optimizer, _plain_step(model, optimizer, scheduler, ocfg.max_grad_norm), False)


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
    scheduler = _schedule(optimizer, ocfg.warmup_steps)
    return Setup(
        model,
        optimizer,
        _plain_step(model, optimizer, scheduler, ocfg.max_grad_norm),
        mcfg.gradient_checkpointing,
    )


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


# ----------------------------------------------------------------- the parent: batches, children, report


def make_batches(args: argparse.Namespace, model_path: str, out: Path) -> None:
    """Tokenise ``warmup + steps`` batches once with the node's data path and save them for the children."""
    from safetensors.torch import save_file

    from cogen.corpora import get_corpus
    from cogen.data import train_batches

    data = DataConfig(block_size=args.block_size, batch_size=args.batch_size)
    try:
        stream = train_batches(
            get_corpus(args.domain),
            models.load_tokenizer(model_path),
            block_size=data.block_size,
            batch_size=data.batch_size,
            shard=0,
            num_shards=data.num_shards,
            seed=data.seed,
            validation_fraction=data.validation_fraction,
        )
    except (ValueError, OSError) as e:
        raise BenchError(f"cannot read domain {args.domain!r}: {e}") from None
    batches = [next(stream) for _ in range(args.warmup + args.steps)]
    save_file({"input_ids": torch.stack(batches).contiguous()}, str(out))


def run_child(name: str, args: argparse.Namespace, model_path: str, batches: Path) -> dict[str, Any]:
    """Run one configuration in a fresh process (this script, ``--worker``) and read its JSON line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--model",
        args.model,
        "--model-path",
        model_path,
        "--batches",
        str(batches),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
    ]
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-5:])
        raise BenchError(
            f"configuration {name} failed (exit code {proc.returncode}); see its output above\n{tail}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    cogen, bare, full = results["cogen"], results["bare_int8_lora"], results["fp32_full"]
    return {
        "throughput_ratio": cogen["samples_per_second"] / bare["samples_per_second"],
        "state_memory_ratio": cogen["state_bytes"]["total"] / full["state_bytes"]["total"],
        "peak_memory_ratio": cogen["peak_rss_bytes"] / full["peak_rss_bytes"],
    }


def meets(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def format_report(results: dict[str, dict[str, Any]], figures: dict[str, float]) -> str:
    header = ("config", "s/step", "samples/s", "state bytes", "peak RSS", "peak - baseline", "baseline RSS")
    rows = [
        (
            name,
            f"{r['median_step_seconds']:.3f}",
            f"{r['samples_per_second']:.2f}",
            format_bytes(r["state_bytes"]["total"]),
            format_bytes(r["peak_rss_bytes"]),
            format_bytes(r["peak_over_baseline_bytes"]),
            format_bytes(r["baseline_rss_bytes"]),
        )
        for name, r in results.items()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("s/step: median of the measured steps; state bytes: weights + gradients + optimizer state;")
    lines.append(
        "peak RSS: total peak resident set of the configuration's own process; "
        "baseline RSS: after imports, before the model."
    )
    lines.append("")
    explain = {
        "throughput_ratio": "cogen samples/s / bare_int8_lora samples/s",
        "state_memory_ratio": "cogen state bytes / fp32_full state bytes",
        "peak_memory_ratio": "cogen peak RSS / fp32_full peak RSS",
    }
    for key, value in figures.items():
        op, target = TARGETS[key]
        verdict = "meets target" if meets(key, value) else "MISSES target"
        lines.append(f"{key:<19} {value:7.3f}   ({explain[key]}; target {op} {target}: {verdict})")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> int:
    from cogen.checkpoint import write_json_atomic

    names = [*REQUIRED, *(["fp32_lora"] if args.fp32_lora else [])]
    print(
        f"node overhead benchmark: model {args.model}, batch {args.batch_size}x{args.block_size}, "
        f"{args.threads} thread(s), {args.warmup} warm-up + {args.steps} measured steps, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} (LoRA configs)",
        flush=True,
    )
    model_path = models.resolve_model(args.model)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cogen-bench-") as tmp:
        batches = Path(tmp) / "batches.safetensors"
        print(f"tokenising {args.warmup + args.steps} batches of {args.domain} text ...", flush=True)
        make_batches(args, model_path, batches)
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name}: starting — {DESCRIPTIONS[name]}", flush=True)
            start = time.perf_counter()
            r = results[name] = run_child(name, args, model_path, batches)
            print(
                f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - start:.0f} s — "
                f"{r['median_step_seconds']:.3f} s/step, peak RSS {format_bytes(r['peak_rss_bytes'])}",
                flush=True,
            )
    figures = ratios(results)
    print()
    print(format_report(results, figures), flush=True)
    if args.json:
        write_json_atomic(
            args.json,
            {
                **figures,
                "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
                "meets_targets": {k: meets(k, v) for k, v in figures.items()},
                "settings": {
                    "model": args.model,
                    "model_path": model_path,
                    "batch_size": args.batch_size,
                    "block_size": args.block_size,
                    "threads": args.threads,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "domain": args.domain,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "gradient_checkpointing_applies_to": ["cogen", "bare_int8_lora", "fp32_lora"],
                    "lora": ModelConfig().model_dump(include={"lora_rank", "lora_alpha", "lora_targets"}),
                    "optim": OptimConfig().model_dump(),
                    "peak_memory": "total peak RSS of each configuration's own child process (ru_maxrss)",
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    **results[names[0]]["versions"],
                },
                "configs": results,
            },
        )
        print(f"wrote {args.json}", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="samples/s of a cogen-node step vs a bare transformers + PEFT loop, and memory of "
        "8-bit base + LoRA + 8-bit AdamW vs fp32 full fine-tuning; each configuration in a fresh process",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="model alias, directory or hub id (tiny: quick run)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured ones")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every configuration")
    parser.add_argument("--domain", default="medical", help="corpus the batches come from")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=ModelConfig().gradient_checkpointing,
        help="recompute activations in the LoRA configurations (default: as a node); fp32_full never does",
    )
    parser.add_argument(
        "--fp32-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run fp32 base + LoRA, for context",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all figures here as JSON (atomically)")
    parser.add_argument("--worker", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("batch_size", "block_size", "steps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.block_size < 8:
        parser.error("--block-size must be at least 8")
    if args.worker and not (args.model_path and args.batches):
        parser.error("--worker needs --model-path and --batches")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cogen.telemetry import setup_logging

    if args.worker:
        setup_logging(os.environ.get("COGEN_LOG_LEVEL", "WARNING"))
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        result = run_worker(args.worker, args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    setup_logging()
    from cogen.exit_codes import ExitCode

    try:
        return run_benchmark(args)
    except models.ModelError as e:
        logger.error("node_overhead: model error: %s", e)
        return ExitCode.MODEL
    except BenchError as e:
        logger.error("node_overhead: %s", e)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        logger.error("node_overhead: interrupted")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
