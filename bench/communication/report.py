"""The communication benchmark's figures (the JSON keys), its targets and its printed table."""

from __future__ import annotations

import math
from typing import Any

from ..harness import meets as meets_target
from ..harness import table_lines
from .arms import ArmResult
from .model import Settings

TARGETS = {"bytes_ratio": (">=", 400.0), "loss_gap_pct": ("<=", 5.0), "loss_gap_half_pct": ("<=", math.inf)}
AIMS = {"loss_gap_pct": 2.0}
OVERLAP_HOLDS_PCT = 1.0  # the overlapped arm holds the loss if within this of the blocking arm


def figures(
    s: Settings, base: ArmResult, cogen: ArmResult, steps: int, overlap: ArmResult | None = None
) -> dict[str, Any]:
    """The keys of the JSON report: ratio, losses, gaps, bytes per token, times."""
    tokens = steps * s.workers * s.batch_size * s.block_size
    extra: dict[str, Any] = {}
    if overlap is not None:
        extra = {
            "cogen_overlap_loss": overlap.loss,
            "cogen_overlap_loss_half": overlap.loss_half,
            "overlap_vs_cogen_pct": 100.0 * (overlap.loss - cogen.loss) / cogen.loss,
            "overlap_vs_cogen_half_pct": 100.0 * (overlap.loss_half - cogen.loss_half) / cogen.loss_half,
            "overlap_loss_gap_pct": 100.0 * (overlap.loss - base.loss) / base.loss,
            "cogen_overlap_rounds": overlap.rounds,
            "cogen_overlap_seconds": overlap.seconds,
        }
    return {
        "bytes_ratio": base.bytes_sent / max(cogen.bytes_sent, 1),
        "bytes_ratio_measured": base.bytes_measured / max(cogen.bytes_measured, 1),
        "baseline_loss": base.loss,
        "cogen_loss": cogen.loss,
        "baseline_loss_half": base.loss_half,
        "cogen_loss_half": cogen.loss_half,
        "loss_gap_pct": 100.0 * (cogen.loss - base.loss) / base.loss,
        "loss_gap_half_pct": 100.0 * (cogen.loss_half - base.loss_half) / base.loss_half,
        "tokens": tokens,
        "baseline_bytes": base.bytes_sent,
        "cogen_bytes": cogen.bytes_sent,
        "cogen_bytes_measured": cogen.bytes_measured,
        "baseline_bytes_per_token": base.bytes_sent / tokens,
        "cogen_bytes_per_token": cogen.bytes_sent / tokens,
        "baseline_rounds": base.rounds,
        "cogen_rounds": cogen.rounds,
        "baseline_seconds": base.seconds,
        "cogen_seconds": cogen.seconds,
        **extra,
    }


def meets(key: str, value: float) -> bool:
    """Whether a figure meets its target in ``TARGETS``."""
    return meets_target(TARGETS, key, value)


def format_report(s: Settings, f: dict[str, Any]) -> str:
    """The table and the targets, as printed."""
    rows = [
        ("arm", "val loss @half", "val loss @full", "rounds", "bytes sent", "bytes/token", "seconds"),
        ("baseline (fp32, every step)", f"{f['baseline_loss_half']:.4f}", f"{f['baseline_loss']:.4f}",
         str(f["baseline_rounds"]), f"{f['baseline_bytes']:,}", f"{f['baseline_bytes_per_token']:.1f}",
         f"{f['baseline_seconds']:.0f}"),
        (f"cogen (H={s.inner_steps}, lr {s.outer_lr:g}, mu {s.outer_momentum:g}, {s.compression})",
         f"{f['cogen_loss_half']:.4f}",
         f"{f['cogen_loss']:.4f}", str(f["cogen_rounds"]), f"{f['cogen_bytes']:,}",
         f"{f['cogen_bytes_per_token']:.3f}", f"{f['cogen_seconds']:.0f}"),
    ]  # fmt: skip
    if "cogen_overlap_loss" in f:
        rows.append(
            ("cogen overlap (one round late)", f"{f['cogen_overlap_loss_half']:.4f}",
             f"{f['cogen_overlap_loss']:.4f}", str(f["cogen_overlap_rounds"]), f"{f['cogen_bytes']:,}",
             f"{f['cogen_bytes_per_token']:.3f}", f"{f['cogen_overlap_seconds']:.0f}")
        )  # fmt: skip
    lines = table_lines(rows)
    lines += [
        "",
        f"tokens per arm: {f['tokens']:,} ({s.workers} workers x {s.steps} steps x "
        f"{s.batch_size}x{s.block_size}); bytes: what one member sends (butterfly all-reduce estimate)",
        f"bytes_ratio         {f['bytes_ratio']:8.1f}   (baseline bytes / cogen bytes; target >= 400: "
        f"{'meets target' if meets('bytes_ratio', f['bytes_ratio']) else 'MISSES target'}; "
        f"from serialized messages: {f['bytes_ratio_measured']:.1f})",
        f"loss_gap_pct        {f['loss_gap_pct']:8.2f}   (cogen vs baseline at the full budget; target <= 5 "
        f"(aim 2): {'meets target' if meets('loss_gap_pct', f['loss_gap_pct']) else 'MISSES target'})",
        f"loss_gap_half_pct   {f['loss_gap_half_pct']:8.2f}   (the same at half the budget: the trend)",
    ]
    if "cogen_overlap_loss" in f:
        held = abs(f["overlap_vs_cogen_pct"]) <= OVERLAP_HOLDS_PCT
        lines += [
            f"overlap_vs_cogen_pct {f['overlap_vs_cogen_pct']:7.2f}   (overlapped vs blocking cogen at "
            f"the full budget; holds the loss within {OVERLAP_HOLDS_PCT:g} %: {'yes' if held else 'NO'}; "
            f"half budget: {f['overlap_vs_cogen_half_pct']:+.2f} %)",
            f"overlap_loss_gap_pct {f['overlap_loss_gap_pct']:7.2f}   (overlapped cogen vs baseline at the "
            "full budget)",
        ]
    return "\n".join(lines)
