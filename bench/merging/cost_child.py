"""One measurement of the merge-cost benchmark, inside its own fresh process: the floor or one merge.

``python -m bench.merging.cost --worker floor|ties|linear`` runs :func:`run_worker` here: it resets the
process's peak resident set just before the measured phase, reads ``VmHWM`` after it, and samples the
anonymous and file-backed resident sets in a thread (Linux ``/proc/self``); one process per figure,
because peak memory is a per-process figure.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cogen.core.checkpoint import ADAPTER_WEIGHTS

from ..harness import BenchError

METHODS = ("ties", "linear")
WORKERS = ("floor", *METHODS)


# ----------------------------------------------------------------- memory of this process (Linux)


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process in bytes, from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset this process's peak resident set (``VmHWM``) to its current one, so a phase has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as e:
        raise BenchError(f"cannot reset the peak resident set through /proc/self/clear_refs: {e}") from None


class PeakSampler:
    """Samples anonymous and file-backed resident memory every ``interval`` s in a thread; keeps the peaks.

    ``VmHWM`` gives the exact total peak but not its make-up; the sampler tells what a phase allocated
    (anonymous) from adapter file pages that safetensors maps (file-backed, evictable).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _sample(self) -> None:
        status = proc_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.peak_file = max(self.peak_file, status["RssFile"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _phase(start: dict[str, int], sampler: PeakSampler) -> dict[str, int]:
    end = proc_status()
    return {
        "start_rss_bytes": start["VmRSS"],
        "peak_rss_bytes": end["VmHWM"],
        "peak_over_start_bytes": end["VmHWM"] - start["VmRSS"],
        "peak_anon_over_start_bytes": sampler.peak_anon - start["RssAnon"],
        "peak_file_over_start_bytes": sampler.peak_file - start["RssFile"],
    }


# ----------------------------------------------------------------- the children: one measurement each


def worker_floor(paths: list[Path]) -> dict[str, Any]:
    """Load the N experts' adapter tensors (all resident) and form every module's dense delta once."""
    from safetensors.torch import load_file

    configs = [json.loads((p / "adapter_config.json").read_text()) for p in paths]
    if any(c.get("use_rslora") or c.get("fan_in_fan_out") for c in configs):
        raise BenchError("the floor handles plain LoRA adapters only (no rsLoRA, no fan_in_fan_out)")
    reset_peak()
    start = proc_status()
    with PeakSampler() as sampler:
        t0, c0 = time.perf_counter(), time.thread_time()
        factors = [load_file(str(p / ADAPTER_WEIGHTS)) for p in paths]
        read_s = time.perf_counter() - t0
        modules = sorted(k[: -len(".lora_A.weight")] for k in factors[0] if k.endswith(".lora_A.weight"))
        checksum = 0.0
        for module in modules:
            for tensors, config in zip(factors, configs, strict=True):
                lora_a, lora_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
                delta = (lora_b.float() @ lora_a.float()) * (config["lora_alpha"] / lora_a.shape[0])
                checksum += float(delta[0, 0])
        seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_s,
        "read_seconds": read_s,
        "modules": len(modules),
        **_phase(start, sampler),
    }


def worker_merge(method_name: str, paths: list[Path], model_path: str) -> dict[str, Any]:
    """Load the fp32 base and verify the experts (timed apart), then time ``merge_into`` on its own."""
    from cogen.coordinator.merging.experts import load_experts
    from cogen.coordinator.merging.merge import load_base_fp32, merge_into
    from cogen.coordinator.merging.registry import MergeParams, create

    before = proc_status()
    t0 = time.perf_counter()
    model = load_base_fp32(model_path, torch.device("cpu"))
    base_s = time.perf_counter() - t0
    loaded = proc_status()
    # transformers maps fp32 safetensors lazily; the merge's in-place adds would copy those pages into
    # private memory, so do it first (every page written once) and leave that cost out of the merge's
    t0 = time.perf_counter()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.0)
    resident_s = time.perf_counter() - t0
    after_base = proc_status()
    t0 = time.perf_counter()
    experts = load_experts(paths)
    verify_s = time.perf_counter() - t0
    method = create(method_name, MergeParams())
    probe = model.get_parameter(f"{experts[0].modules[0]}.weight")
    reference = probe.detach().clone()
    reset_peak()
    start = proc_status()
    with PeakSampler() as sampler:
        t0, c0 = time.perf_counter(), time.thread_time()
        merge_into(model, experts, [1.0] * len(experts), method)
        seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    phase = _phase(start, sampler)
    if torch.equal(probe.detach(), reference):
        raise BenchError(f"{method_name}: the merge left {experts[0].modules[0]}.weight unchanged")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_s,
        "base_load_seconds": base_s,
        "base_loaded_rss_bytes": loaded["VmRSS"] - before["VmRSS"],
        "base_resident_seconds": resident_s,
        "base_rss_bytes": after_base["VmRSS"] - before["VmRSS"],
        "base_load_peak_rss_bytes": after_base["VmHWM"],
        "verify_seconds": verify_s,
        "modules": len(experts[0].modules),
        **phase,
    }


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.experts]
    baseline = proc_status()["VmRSS"]
    result = (
        worker_floor(paths) if args.worker == "floor" else worker_merge(args.worker, paths, args.model_path)
    )
    return {**result, "baseline_rss_bytes": baseline}
