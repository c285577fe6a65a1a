"""The averaging benchmark's figures (the JSON keys per configuration and overall), targets and table."""

from __future__ import annotations

from typing import Any

from ..harness import Targets, ratio_line, table_lines
from .rounds import Rounds, median

TARGETS: Targets = {"floor_ratio_2": (">=", 0.8), "floor_ratio_2_8bit": (">=", 1.5)}  # floor s / cogen s


# ----------------------------------------------------------------- figures


def suffix(compression: str) -> str:
    return "" if compression == "none" else f"_{compression}"


def figures(configs: list[dict[str, Any]]) -> dict[str, float]:
    """The ratio keys: floor / cogen per path, peers and compression, and cogen / bare hivemind."""
    out: dict[str, float] = {}
    for c in configs:
        key = "floor_ratio" if c["path"] == "netns" else "loopback_ratio"
        if c["floor_ratio"] is not None:
            out[f"{key}_{c['peers']}{suffix(c['compression'])}"] = c["floor_ratio"]
    for c in sorted(configs, key=lambda c: c["path"] != "netns"):  # the netns figure if there is one
        if c["cogen_overhead"] is not None:
            out.setdefault(f"cogen_overhead_{c['peers']}{suffix(c['compression'])}", c["cogen_overhead"])
    return out


COLUMNS = (
    "floor_seconds",
    "bare_seconds",
    "cogen_seconds",
    "floor_ratio",
    "hivemind_floor_ratio",
    "cogen_overhead",
)


def cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.3f}"


def format_table(configs: list[dict[str, Any]]) -> str:
    header = (
        "path",
        "peers",
        "compression",
        "floor s",
        "bare hivemind s",
        "cogen s",
        "ratio",
        "hivemind ratio",
        "cogen/bare",
    )
    rows = [(c["path"], str(c["peers"]), c["compression"], *(cell(c[k]) for k in COLUMNS)) for c in configs]
    lines = table_lines([header, *rows], left=(0, 1, 2))
    lines += [
        "",
        "ratio = floor s / cogen s (time to copy the same bytes once over a raw TCP socket on the same path,",
        "over the time of cogen's outer_step_now); hivemind ratio = floor s / bare hivemind s;",
        "cogen/bare = cogen s / bare DecentralizedAverager.step s. Seconds: medians of the measured rounds.",
    ]
    lines += [
        f"{c['path']} {c['peers']} peers {c['compression']} FAILED: {c['error']}"
        for c in configs
        if c["error"]
    ]
    return "\n".join(lines)


def format_targets(values: dict[str, float]) -> str:
    return "\n".join(ratio_line(key, values.get(key), TARGETS, "floor s / cogen s") for key in TARGETS)


def config_figures(path: str, n: int, compression: str, floor: float, rounds: Rounds) -> dict[str, Any]:
    """One configuration's figures; the ratios are ``None`` where a kind has no whole round."""
    cogen, bare = median(rounds.seconds["cogen"]), median(rounds.seconds["bare"])
    return {
        "path": path,
        "peers": n,
        "compression": compression,
        "floor_seconds": floor,
        "cogen_seconds": cogen,
        "bare_seconds": bare,
        "cogen_rounds": rounds.seconds["cogen"],
        "bare_rounds": rounds.seconds["bare"],
        "failed_rounds": rounds.failed,
        "error": rounds.error,
        "log_tail": rounds.log_tail,
        "floor_ratio": floor / cogen if cogen else None,
        "hivemind_floor_ratio": floor / bare if bare else None,
        "cogen_overhead": cogen / bare if cogen and bare else None,
    }
