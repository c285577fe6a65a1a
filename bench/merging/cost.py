"""What merging N experts into their base costs, in time and peak memory, against loading them once.

A merge (``cogen-coordinator merge``) forms every expert's dense delta ``ΔW = B @ A · scale`` module by
module (``experts.iter_deltas``), merges the N deltas with the chosen method and adds the result to the
fp32 base. Whatever a method does, it cannot do less than read the N experts' adapter tensors and form
each module's dense delta once: that is **the floor** here, written with safetensors + torch only
(``safetensors.torch.load_file`` of every expert, all N resident, then one dense delta at a time).
The merge is cogen's ``merge_into`` with ``ties`` (the heaviest method) and ``linear``; the base model's
own load and the experts' sha256 verification (``load_experts``) are timed and recorded apart, and the
merge's memory is counted from the resident set after the base is loaded, so the ratios measure the
merge alone.

The experts are real cogen checkpoints: PEFT LoRA adapters (seeded random A and B, every default target
module) on the real base model, written by ``cogen.core.checkpoint.save_adapter`` exactly as a node writes
them. Every measurement runs in a fresh child process (this module with a hidden ``--worker``); a child
resets its peak resident set (``/proc/self/clear_refs``) just before the measured phase and reads
``VmHWM`` after it, and a sampler thread records the peak anonymous and file-backed resident sets, which
tell memory a merge allocates from adapter file pages that safetensors maps (evictable page cache).
The child's side (the floor, a merge, and their memory figures) is ``cost_child.py``.

Run ``python -m bench.merging.cost --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cogen.core import models
from cogen.core.checkpoint import ADAPTER_WEIGHTS
from cogen.core.telemetry import format_bytes

from ..harness import (
    child_main,
    new_parser,
    parse,
    run_child,
    run_main,
    table_lines,
    write_report,
)
from .cost_child import METHODS, WORKERS, run_worker

logger = logging.getLogger("cogen.bench.merge_cost")


# ----------------------------------------------------------------- the parent


def make_experts(
    model_name: str, model_path: str, root: Path, count: int, rank: int
) -> tuple[list[Path], dict[str, int]]:
    """``count`` seeded random LoRA experts on the base, saved by ``save_adapter``; also their sizes."""
    from cogen.core.checkpoint import AdapterMetadata, save_adapter
    from cogen.core.config import ModelConfig

    cfg = ModelConfig(lora_rank=rank)
    model = models.add_lora(models.load_base(model_path, "fp32", torch.device("cpu")), cfg, seed=0)
    params = models.trainable_parameters(model)
    dense = sum(m.base_layer.weight.numel() * 4 for _, m in model.named_modules() if hasattr(m, "lora_A"))
    domains = ("medical", "legal", "code", "literature")
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        meta = AdapterMetadata(
            expert=domains[i % len(domains)], base_model=model_name, precision="fp32", steps=100,
            samples=400, tokens=102400,
        )  # fmt: skip
        paths.append(save_adapter(model, root / f"expert-{i}", meta))
        print(f"  expert {i + 1}/{count} written: {paths[-1]}", flush=True)
    sizes = {
        "adapter_file_bytes": (paths[0] / ADAPTER_WEIGHTS).stat().st_size,
        "lora_parameters": sum(p.numel() for p in params),
        "dense_delta_bytes": dense,
    }
    return paths, sizes


def warm_page_cache(paths: list[Path]) -> None:
    """Read the adapter files once so that every measurement reads them from the page cache."""
    for path in paths:
        with open(path / ADAPTER_WEIGHTS, "rb") as handle:
            while handle.read(1 << 24):
                pass


def run_measurement(
    worker: str, paths: list[Path], args: argparse.Namespace, model_path: str
) -> dict[str, Any]:
    """Run one measurement in a fresh process (this module, ``--worker``) and read its figures."""
    flags = ["--worker", worker, "--threads", str(args.threads), "--model-path", model_path]
    flags += ["--experts", *map(str, paths)]
    return run_child(__spec__.name, flags, args.threads, f"{worker} with {len(paths)} experts")


def figures(results: dict[int, dict[str, dict[str, Any]]], methods: list[str]) -> dict[str, float]:
    """``time_ratio_<N>`` / ``memory_ratio_<N>`` for the first method, ``..._<method>`` for the others."""
    out = {}
    for n, runs in results.items():
        floor = runs["floor"]
        for i, method in enumerate(methods):
            suffix = "" if i == 0 else f"_{method}"
            out[f"time_ratio_{n}{suffix}"] = runs[method]["seconds"] / floor["seconds"]
            out[f"cpu_time_ratio_{n}{suffix}"] = runs[method]["cpu_seconds"] / floor["cpu_seconds"]
            out[f"memory_ratio_{n}{suffix}"] = (
                runs[method]["peak_over_start_bytes"] / floor["peak_over_start_bytes"]
            )
    return out


def streaming(
    results: dict[int, dict[str, dict[str, Any]]], methods: list[str], dense: int
) -> dict[str, Any]:
    """How a merge's memory grows with N, against holding all N dense deltas (``dense`` bytes each)."""
    sizes = sorted(results)
    out: dict[str, Any] = {"dense_delta_bytes_per_expert": dense}
    for method in methods:
        peaks = {n: results[n][method]["peak_over_start_bytes"] for n in sizes}
        anon = {n: results[n][method]["peak_anon_over_start_bytes"] for n in sizes}
        entry: dict[str, Any] = {
            "fraction_of_all_dense_deltas": {n: peaks[n] / (n * dense) for n in sizes},
        }
        if len(sizes) > 1:
            span = sizes[-1] - sizes[0]
            entry["bytes_per_added_expert"] = (peaks[sizes[-1]] - peaks[sizes[0]]) / span
            entry["anon_bytes_per_added_expert"] = (anon[sizes[-1]] - anon[sizes[0]]) / span
            entry["streams"] = entry["bytes_per_added_expert"] < dense / 2
        out[method] = entry
    return out


def format_report(
    results: dict[int, dict[str, dict[str, Any]]], methods: list[str], sizes: dict[str, int]
) -> str:
    dense = sizes["dense_delta_bytes"]
    header = (
        "N",
        "run",
        "seconds",
        "x floor",
        "CPU s",
        "x floor",
        "peak-start",
        "x floor",
        "anon",
        "file",
        "N x dense ΔW",
    )
    rows = []
    for n, runs in results.items():
        floor = runs["floor"]
        for name in ("floor", *methods):
            r = runs[name]
            rows.append((
                str(n), name, f"{r['seconds']:.2f}", f"{r['seconds'] / floor['seconds']:.2f}",
                f"{r['cpu_seconds']:.2f}", f"{r['cpu_seconds'] / floor['cpu_seconds']:.2f}",
                format_bytes(r["peak_over_start_bytes"]),
                f"{r['peak_over_start_bytes'] / floor['peak_over_start_bytes']:.2f}",
                format_bytes(r["peak_anon_over_start_bytes"]), format_bytes(r["peak_file_over_start_bytes"]),
                format_bytes(n * dense),
            ))  # fmt: skip
    lines = table_lines([header, *rows], left=(1,))
    merge = next(iter(results.values()))[methods[0]]
    lines += [
        "",
        "seconds: wall (perf_counter); CPU s: CPU time of the one working thread (robust to other load);",
        "floor: safetensors load_file of the N adapters (all resident) + every module's dense delta once;",
        "peak-start: peak resident set of the measured phase minus the resident set at its start (for a",
        "merge, with the fp32 base already loaded and resident); anon / file: sampled peaks of anonymous and",
        "file-backed (mapped adapter files) resident memory over the start.",
        f"base (apart): loaded in {merge['base_load_seconds']:.1f} s "
        f"(+{format_bytes(merge['base_loaded_rss_bytes'])} resident: mapped lazily), made resident in "
        f"{merge['base_resident_seconds']:.1f} s (+{format_bytes(merge['base_rss_bytes'])} in all);",
        f"experts' sha256 check (apart): {merge['verify_seconds']:.2f} s at N = {next(iter(results))}",
        f"one expert: {format_bytes(sizes['adapter_file_bytes'])} adapter file, "
        f"{format_bytes(dense)} of dense fp32 deltas",
        "",
    ]
    for key, value in figures(results, methods).items():
        what = {"t": "merge s / floor s, wall", "c": "merge / floor, CPU s of the working thread"}.get(
            key[0], "merge peak-start / floor peak-start"
        )
        lines.append(f"{key:<25} {value:7.2f}   ({what})")
    for method, entry in streaming(results, methods, dense).items():
        if isinstance(entry, dict) and "streams" in entry:
            verdict = "streams" if entry["streams"] else "DOES NOT stream"
            lines.append(
                f"{method}: +{format_bytes(entry['bytes_per_added_expert'])} peak per added expert "
                f"(anon +{format_bytes(entry['anon_bytes_per_added_expert'])}) vs "
                f"{format_bytes(dense)} dense ΔW per expert: {verdict}"
            )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> int:
    print(
        f"merge cost benchmark: model {args.model}, LoRA rank {args.rank}, N = {args.sizes}, methods "
        f"{args.methods}, {args.threads} thread(s), every measurement in a fresh process",
        flush=True,
    )
    model_path = models.resolve_model(args.model)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="cogen-merge-bench-") as tmp:
        print(f"writing {max(args.sizes)} expert checkpoints ...", flush=True)
        t0 = time.perf_counter()
        paths, sizes = make_experts(args.model, model_path, Path(tmp), max(args.sizes), args.rank)
        print(f"experts written in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = [(n, w) for n in args.sizes for w in ("floor", *args.methods)]
        for i, (n, worker) in enumerate(runs, 1):
            warm_page_cache(paths[:n])
            t0 = time.perf_counter()
            r = results.setdefault(n, {})[worker] = run_measurement(worker, paths[:n], args, model_path)
            peak = format_bytes(r["peak_over_start_bytes"])
            print(
                f"[{i}/{len(runs)}] N={n} {worker}: {r['seconds']:.2f} s measured, peak over start {peak} "
                f"({time.perf_counter() - t0:.0f} s with start-up)",
                flush=True,
            )
    print()
    print(format_report(results, args.methods, sizes), flush=True)
    write_report(
        args.json,
        {
            **figures(results, args.methods),
            "streaming": streaming(results, args.methods, sizes["dense_delta_bytes"]),
            "sizes": sizes,
            "settings": {
                "model": args.model,
                "model_path": model_path,
                "lora_rank": args.rank,
                "experts": args.sizes,
                "methods": args.methods,
                "headline_method": args.methods[0],
                "threads": args.threads,
                "merge_params": "cogen defaults: density 0.5, majority_sign total, equal weights",
                "floor": "safetensors load_file of the N adapters (all resident) + each dense delta once",
                "memory": "VmHWM after /proc/self/clear_refs reset, minus VmRSS at the phase's start",
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
            },
            "runs": {str(n): runs for n, runs in results.items()},
        },
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(
        "time and peak memory of merging N LoRA experts into their base (cogen merge_into) "
        "against loading the N experts once; each measurement in a fresh process",
        show_defaults=True,
    )
    parser.add_argument("--model", default="smollm2-135m", help="base model alias, directory or hub id")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="numbers of experts N")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="merge methods; the first one "
        "gives the time_ratio_<N> / memory_ratio_<N> keys"
    )  # fmt: skip
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the generated experts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every measurement")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--experts", nargs="+", help=argparse.SUPPRESS)
    args = parse(parser, argv)
    if any(n < 1 for n in args.sizes):
        parser.error("--sizes must all be at least 1")
    args.sizes = sorted(set(args.sizes))
    args.methods = list(dict.fromkeys(args.methods))
    if args.rank < 1 or args.threads < 1:
        parser.error("--rank and --threads must be at least 1")
    if args.worker and not (args.model_path and args.experts):
        parser.error("--worker needs --model-path and --experts")
    if not sys.platform.startswith("linux"):
        parser.error("this benchmark reads /proc/self (Linux only)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return child_main(lambda: run_worker(args))
    return run_main("merge_cost", lambda: run_benchmark(args), model_errors=True)


if __name__ == "__main__":
    sys.exit(main())
