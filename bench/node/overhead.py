"""What a ``cogen-node`` training step costs, and what its 8-bit method saves in memory.

Throughput: samples/s of the exact step a node runs (``ExpertTrainer.step`` on an 8-bit base with LoRA
adapters and bitsandbytes AdamW8bit) against the floor, a hand-written transformers + PEFT loop on the
same 8-bit base, LoRA config, optimizer, batches and thread count.

Memory: the node's method against fp32 full fine-tuning (all weights trainable, torch AdamW), both as
model-state bytes (weights + gradients + optimizer state, ``cogen.core.telemetry.model_state_bytes``) and as
the measured peak resident set size of the process.

Every configuration runs in a fresh child process (this module with ``--worker NAME``), one after
another, because peak RSS is a per-process figure. The batches are tokenised once, up front, by
``cogen.core.data.train_batches`` and handed to every child, so no configuration times tokenisation.
The child's side (building and measuring one configuration) is ``overhead_child.py``.

Run ``python -m bench.node.overhead --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cogen.core import models
from cogen.core.config import DataConfig, ModelConfig, OptimConfig
from cogen.core.telemetry import format_bytes

from ..harness import (
    BenchError,
    child_main,
    meets,
    new_parser,
    parse,
    ratio_line,
    run_child,
    run_main,
    table_lines,
    targets_json,
    write_report,
)
from .overhead_child import BUILDERS, DESCRIPTIONS, run_worker

TARGETS = {
    "throughput_ratio": (">=", 0.97),
    "state_memory_ratio": ("<=", 0.25),
    "peak_memory_ratio": ("<=", 0.5),
}
REQUIRED = ("cogen", "bare_int8_lora", "fp32_full")


# ----------------------------------------------------------------- the parent: batches, children, report


def make_batches(args: argparse.Namespace, model_path: str, out: Path) -> None:
    """Tokenise ``warmup + steps`` batches once with the node's data path and save them for the children."""
    from safetensors.torch import save_file

    from cogen.core.corpora import get_corpus
    from cogen.core.data import train_batches

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


def run_config(name: str, args: argparse.Namespace, model_path: str, batches: Path) -> dict[str, Any]:
    """Run one configuration in a fresh process (this module, ``--worker``) and read its figures."""
    flags = ["--worker", name, "--model", args.model, "--model-path", model_path, "--batches", str(batches)]
    flags += ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    flags.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    return run_child(__spec__.name, flags, args.threads, f"configuration {name}")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    cogen, bare, full = results["cogen"], results["bare_int8_lora"], results["fp32_full"]
    return {
        "throughput_ratio": cogen["samples_per_second"] / bare["samples_per_second"],
        "state_memory_ratio": cogen["state_bytes"]["total"] / full["state_bytes"]["total"],
        "peak_memory_ratio": cogen["peak_rss_bytes"] / full["peak_rss_bytes"],
    }


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
    lines = table_lines([header, *rows])
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
    lines += [ratio_line(key, value, TARGETS, explain[key], width=19) for key, value in figures.items()]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> int:
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
            r = results[name] = run_config(name, args, model_path, batches)
            print(
                f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - start:.0f} s — "
                f"{r['median_step_seconds']:.3f} s/step, peak RSS {format_bytes(r['peak_rss_bytes'])}",
                flush=True,
            )
    figures = ratios(results)
    print()
    print(format_report(results, figures), flush=True)
    write_report(
        args.json,
        {
            **figures,
            "targets": targets_json(TARGETS),
            "meets_targets": {k: meets(TARGETS, k, v) for k, v in figures.items()},
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
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(
        "samples/s of a cogen-node step vs a bare transformers + PEFT loop, and memory of "
        "8-bit base + LoRA + 8-bit AdamW vs fp32 full fine-tuning; each configuration in a fresh process",
        show_defaults=True,
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
    parser.add_argument("--worker", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parse(parser, argv)
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
    if args.worker:
        return child_main(lambda: run_worker(args.worker, args))
    return run_main("node_overhead", lambda: run_benchmark(args), model_errors=True)


if __name__ == "__main__":
    sys.exit(main())
