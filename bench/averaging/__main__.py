"""How long cogen's outer-step averaging takes, against a raw TCP copy of the same bytes.

Every peer is its own OS process (this module with ``--worker peer``) holding its own hivemind DHT,
cogen's ``GroupAverager`` and, for comparison, a bare hivemind ``DecentralizedAverager`` with the
same tensors, matchmaking settings and wire compression. The parent schedules every round at a
common wall-clock start; a round's time is the latest peer's end minus that start. Rounds of
cogen's ``outer_step_now`` (delta, checks, all-reduce + all-gather, verification, outer step) and
of the bare ``DecentralizedAverager.step`` follow each other: one warm-up and ``--rounds`` measured
rounds of the bare averager, then the same of cogen's.

The floor is one process sending the same bytes to another over a plain TCP socket on the same
path (``--worker floor-recv`` / ``floor-send``). Paths: (a) network namespaces, every peer on its
own 1 Gbit/s ``tbf`` link to a bridge (``cogen.core.netns``; needs root), and (b) plain loopback.

Run ``python -m bench.averaging --help``; ``bench/README.md`` explains the figures. This module is the
measurement; ``report.py`` its figures, targets and table; ``children.py`` starts the worker processes
and ``rounds.py`` times rounds among them; ``workers.py`` is what runs inside each worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from cogen.core.netns import NetnsUnavailable, Switch, remove_stale

from ..harness import (
    meets,
    new_parser,
    parse,
    run_main,
    targets_json,
    write_report,
)
from .children import Route
from .report import TARGETS, cell, config_figures, figures, format_table, format_targets
from .rounds import measure_floor, run_configs, threads_per_peer
from .workers import MB, run_worker, shapes_for

logger = logging.getLogger("cogen.bench.averaging")

COMPRESSIONS = ("none", "8bit")


# ----------------------------------------------------------------- the parent: main flow


def _paths(args: argparse.Namespace) -> tuple[list[Route], dict[str, str]]:
    """The paths to measure; builds the namespaces (removing a crashed run's first) unless skipped."""
    paths: list[Route] = []
    skipped: dict[str, str] = {}
    if args.skip_netns:
        skipped["netns"] = "--skip-netns"
    else:
        try:
            stale = remove_stale()
            if stale:
                print(f"removed network namespaces left by an earlier run: {', '.join(stale)}", flush=True)
            paths.append(Route("netns", Switch(max(max(args.peers), 2), rate=args.rate).create()))
        except NetnsUnavailable as e:
            skipped["netns"] = str(e)
            print(f"skipping the network-namespace path: {e}", flush=True)
    if args.skip_loopback:
        skipped["loopback"] = "--skip-loopback"
    else:
        paths.append(Route("loopback", None))
    return paths, skipped


def measure(
    paths: list[Route], args: argparse.Namespace, tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Floors and all configurations; returns per-config figures and the floors' raw seconds."""
    nbytes = args.size_mb * MB
    configs: list[dict[str, Any]] = []
    floors: dict[str, Any] = {}
    for path in paths:
        print(
            f"[{path.name}] raw TCP floor: {nbytes / MB:.0f} MB, {args.rounds} copies after a warm-up",
            flush=True,
        )
        copies = measure_floor(path, nbytes, args.rounds, tmp)
        floor = statistics.median(copies)
        floors[path.name] = {"seconds": floor, "copies": copies}
        print(
            f"[{path.name}] raw TCP floor: {floor:.3f} s ({8 * nbytes / floor / 1e9:.2f} Gbit/s)", flush=True
        )
        for n in args.peers:
            for compression, rounds in run_configs(path, n, args, tmp).items():
                configs.append(config_figures(path.name, n, compression, floor, rounds))
                c = configs[-1]
                cogen, bare = cell(c["cogen_seconds"]), cell(c["bare_seconds"])
                print(f"[{path.name} {n} peers {compression}] cogen {cogen} s, bare hivemind {bare} s, "
                      f"floor {floor:.3f} s", flush=True)  # fmt: skip
    return configs, floors


def run_benchmark(args: argparse.Namespace) -> int:
    nbytes = args.size_mb * MB
    print(
        f"averaging benchmark: {nbytes / MB:.0f} MB of fp32 per peer ({len(shapes_for(nbytes))} tensors), "
        f"peers {args.peers}, {args.rounds} measured round(s) after 1 warm-up, compressions "
        f"{', '.join(args.compressions)}, threads per peer "
        f"{', '.join(f'{threads_per_peer(args, n)} ({n} peers)' for n in args.peers)}",
        flush=True,
    )
    paths, skipped = _paths(args)
    try:
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            configs, floors = measure(paths, args, args.log_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="cogen-bench-averaging-") as tmp:
                configs, floors = measure(paths, args, Path(tmp))
    finally:
        for path in paths:
            if path.switch is not None:
                path.switch.remove()
    values = figures(configs)
    print()
    print(format_table(configs))
    print()
    print(format_targets(values), flush=True)
    write_report(
        args.json,
        {
            **values,
            "targets": targets_json(TARGETS),
            "meets_targets": {k: meets(TARGETS, k, values[k]) for k in TARGETS if k in values},
            "floor_seconds": {k: v["seconds"] for k, v in floors.items()},
            "floors": floors,
            "bytes_per_peer": nbytes,
            "skipped": skipped,
            "settings": _settings(args),
            "configs": configs,
        },
    )
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import hivemind
    import torch

    from cogen.core.config import GroupConfig

    nbytes = args.size_mb * MB
    return {
        "size_mb": args.size_mb,
        "bytes_per_peer": nbytes,
        "shapes": shapes_for(nbytes),
        "peers": args.peers,
        "rounds": args.rounds,
        "warmup_rounds": 1,
        "compressions": args.compressions,
        "rate": args.rate,
        "threads_per_peer": {n: threads_per_peer(args, n) for n in args.peers},
        "tbf": "burst 1mb latency 50ms, on both ends of every peer's veth",
        "round_timeout_s": args.round_timeout,
        "group_config": GroupConfig(compression="none").model_dump(exclude={"compression", "group_size"}),
        "cogen_overhead_path": "netns if measured, else loopback",
        "hivemind": hivemind.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(
        "time of cogen's outer-step averaging (GroupAverager.outer_step_now) and of bare "
        "hivemind averaging among 2 and 4 peer processes, against a raw TCP copy of the same bytes, across "
        "1 Gbit/s network namespaces and on loopback",
        show_defaults=True,
    )
    parser.add_argument(
        "--size-mb", type=int, default=100, help="fp32 pseudo-gradient per peer, in MB (10^6 B)"
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes to measure")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds of each kind (after 1 warm-up)"
    )
    parser.add_argument(
        "--compressions",
        nargs="+",
        choices=COMPRESSIONS,
        default=list(COMPRESSIONS),
        help="wire formats to measure (none: fp32; 8bit: cogen's default)",
    )
    parser.add_argument("--rate", default="1gbit", help="tbf rate of every peer's link in the namespaces")
    parser.add_argument(
        "--round-timeout", type=float, default=120.0, help="averaging timeout of one round, s"
    )
    parser.add_argument(
        "--threads-per-peer",
        type=int,
        default=0,
        help="torch/OpenMP threads of each peer process (0: the machine's cores divided among the peers)",
    )
    parser.add_argument("--skip-netns", action="store_true", help="do not measure across network namespaces")
    parser.add_argument("--skip-loopback", action="store_true", help="do not measure on plain loopback")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep every worker's log here (default: a temp dir, removed)",
    )
    parser.add_argument("--worker", choices=("peer", "floor-recv", "floor-send"), help=argparse.SUPPRESS)
    for hidden in ("--host", "--target", "--initial-peers"):
        parser.add_argument(
            hidden, default="[]" if hidden == "--initial-peers" else None, help=argparse.SUPPRESS
        )
    for hidden in ("--index", "--bytes", "--count"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    args = parse(parser, argv)
    if args.size_mb < 1 or args.rounds < 1 or args.round_timeout <= 0 or args.threads_per_peer < 0:
        parser.error("--size-mb, --rounds >= 1; --round-timeout > 0; --threads-per-peer >= 0")
    if any(not 2 <= n <= 64 for n in args.peers):
        parser.error("--peers: each group size must be between 2 and 64")
    args.peers = sorted(set(args.peers))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    return run_main(
        "averaging",
        lambda: run_benchmark(args),
        plain_logging=True,
        unwind_on_sigterm=True,
    )


if __name__ == "__main__":
    sys.exit(main())
