"""Compute utilisation of a group of two cogen nodes on a WAN-like link, with and without ``--overlap``.

Three network namespaces behind one switch (``cogen.core.netns``): the coordinator (the DHT bootstrap
peer) in ``p0``, two real ``cogen-node`` processes in ``p1`` and ``p2``; every link is rate-limited
with ``tbf`` on both ends (``--rate``, 100 Mbit/s). Where the kernel has ``netem``, each link also
gets half of ``--delay-ms`` on each end (one-way delay between the nodes); this machine's kernel has
no netem, so the figures here come from the rate limit alone (the run says which).

A node's own Prometheus metrics (``--metrics-port``, inside its namespace) are scraped every
``--scrape-s`` by a small worker in the same namespace (this module with ``--worker scrape``):
``cogen_node_steps`` and ``cogen_node_step_seconds`` (the time inside inner steps). A node's window
runs from the first scrape that shows an inner step done to the first that shows its last; its
utilisation = Σ inner-step seconds in the window / window wall time. ``utilisation_*`` is the mean over
the two nodes. Outer rounds and their durations come from the nodes' log lines.

The model: SmolLM2-135M on an 8-bit base with rank-64 LoRA on all seven projections (19.5M trainable
parameters: ~20 MB per pseudo-gradient on the 8-bit wire, 1.6 s at 100 Mbit/s each way), so that a
round's bytes and its checks are a real share of H inner steps on this CPU. The nodes run with
``--group-size 2`` (a round starts as soon as both members are there, instead of waiting the whole
matchmaking time for more) and ``--matchmaking-s 10`` (a groupmate up to ~20 s late still joins: on a
loaded 2-core machine the two nodes' steps drift by more than the default 5 s allows).

The hosts' side (delays, processes in namespaces, the scraper) is ``wan_hosts.py``.

Run ``python -m bench.swarm.wan --help``; ``bench/README.md`` explains the figures. Needs root.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogen.core.netns import NetnsUnavailable, Switch, remove_stale

from ..harness import BenchError, new_parser, parse, run_main, table_lines, write_report
from .wan_hosts import Procs, add_delay, last_row, netem_available, read_json, read_rows, scrape, wait_for

logger = logging.getLogger("cogen.bench.wan")

TARGETS = {"utilisation": 0.9}
METRICS_PORT = 9400  # inside each node's own namespace: nothing else listens there
ROUND = re.compile(r"outer step (\d+) (applied|skipped \((.*?)\)) \| group of (\d+) \| ([\d.]+) s")


# ----------------------------------------------------------------- figures


@dataclass
class NodeFigures:
    """One node's window and what happened in it."""

    utilisation: float
    wall_s: float
    compute_s: float
    steps: int
    rounds_ok: int
    rounds_failed: int
    round_seconds: list[float] = field(default_factory=list)


def node_figures(rows: list[dict[str, Any]], last_step: int, log: str) -> NodeFigures:
    """The window from the first scrape with an inner step done to the first with ``last_step`` done."""
    done = [r for r in rows if r.get("steps", 0) >= 1 and "sum" in r]
    first = done[0] if done else None
    last = next((r for r in done if r["steps"] >= last_step), None)
    if first is None or last is None or last["t"] <= first["t"]:
        raise BenchError(f"the scrapes do not cover steps 1..{last_step} (saw {len(rows)} scrapes)")
    wall, compute = last["t"] - first["t"], last["sum"] - first["sum"]
    rounds = ROUND.findall(log)
    return NodeFigures(
        utilisation=compute / wall, wall_s=wall, compute_s=compute, steps=int(last["steps"] - first["steps"]),
        rounds_ok=sum(1 for r in rounds if r[1] == "applied"),
        rounds_failed=sum(1 for r in rounds if r[1] != "applied"),
        round_seconds=[float(r[4]) for r in rounds if r[1] == "applied"],
    )  # fmt: skip


def run_arm(switch: Switch, args: argparse.Namespace, overlap: bool, log_dir: Path) -> list[NodeFigures]:
    """A coordinator and two nodes trained to ``rounds × H`` steps; every process is gone on return."""
    arm = "overlap" if overlap else "no_overlap"
    procs, swarm, last_step = Procs(switch, log_dir), f"wanbench_{arm}", args.rounds * args.inner_steps
    try:
        ready = log_dir / f"{arm}-coordinator.json"
        procs.start(f"{arm}-coordinator", 0, [
            "-m", "cogen.coordinator.cli", "--swarm", swarm, "--host", switch.addresses[0], "--port", "0",
            "--api-port", "0", "--ready-file", str(ready), "--record-ttl-s", "30",
        ])  # fmt: skip
        info = wait_for(lambda: read_json(ready), 120, "coordinator ready", procs, [f"{arm}-coordinator"])
        nodes = [f"{arm}-node{i}" for i in (1, 2)]
        scrapes = [log_dir / f"{name}.scrape.jsonl" for name in nodes]
        for i, (name, scrape_path) in enumerate(zip(nodes, scrapes, strict=True), start=1):
            procs.start(name, i, [
                "-m", "cogen.node.cli", "--swarm", swarm, "--host", switch.addresses[i],
                "--initial-peers", *info["initial_peers"], "--expert", "medical", "--model", args.model,
                "--lora-rank", str(args.lora_rank), "--batch-size", str(args.batch_size),
                "--block-size", str(args.block_size), "--inner-steps", str(args.inner_steps),
                "--max-steps", str(last_step), "--threads", "1", "--num-shards", "4",
                "--group-size", "2", "--matchmaking-s", str(args.matchmaking_s),
                "--metrics-port", str(METRICS_PORT), "--record-ttl-s", "30", "--log-interval-s", "15",
                "--output-dir", str(log_dir / name), "--overlap" if overlap else "--no-overlap",
            ])  # fmt: skip
            procs.start(f"{name}-scrape", i, [
                "-m", __spec__.name, "--worker", "scrape", "--url",
                f"http://127.0.0.1:{METRICS_PORT}/metrics", "--out", str(scrape_path),
                "--scrape-s", str(args.scrape_s), "--max-s", str(args.arm_timeout),
            ])  # fmt: skip
        started = time.monotonic()

        def finished() -> bool:
            steps = [int(last_row(p).get("steps", 0)) for p in scrapes]
            if time.monotonic() - finished.shown >= 15:  # type: ignore[attr-defined]
                finished.shown = time.monotonic()  # type: ignore[attr-defined]
                print(f"  [{arm}] {time.monotonic() - started:4.0f} s: inner steps {steps} of {last_step}",
                      flush=True)  # fmt: skip
            return all(procs.procs[n].poll() is not None for n in nodes)

        finished.shown = time.monotonic()  # type: ignore[attr-defined]
        wait_for(finished, args.arm_timeout, f"{arm}: both nodes done", procs, [])
        for name in nodes:
            if procs.procs[name].returncode != 0:
                raise BenchError(
                    f"{name} exited with code {procs.procs[name].returncode}\n{procs.tail(name)}"
                )
        return [
            node_figures(read_rows(p), last_step, procs.log(n)) for n, p in zip(nodes, scrapes, strict=True)
        ]
    finally:
        procs.close()


def summarise(nodes: list[NodeFigures]) -> dict[str, Any]:
    rounds = [s for n in nodes for s in n.round_seconds]
    wall, compute, steps = (sum(getattr(n, k) for n in nodes) for k in ("wall_s", "compute_s", "steps"))
    return {
        "utilisation": statistics.mean(n.utilisation for n in nodes),
        "steps_per_second": steps / wall,  # per node
        "step_seconds": compute / steps,
        "idle_seconds_per_node": (wall - compute) / len(nodes),
        "rounds_ok": [n.rounds_ok for n in nodes],
        "rounds_failed": [n.rounds_failed for n in nodes],
        "round_seconds_median": statistics.median(rounds) if rounds else math.nan,
        "nodes": [asdict(n) for n in nodes],
    }


def format_table(arms: dict[str, dict[str, Any]]) -> str:
    rows = [("arm", "utilisation", "node 1", "node 2", "inner step s", "steps/s/node", "idle s/node",
             "rounds ok/failed", "round s (median)")]  # fmt: skip
    for name, a in arms.items():
        n = a["nodes"]
        rows.append((
            name, f"{a['utilisation']:.3f}", f"{n[0]['utilisation']:.3f}", f"{n[1]['utilisation']:.3f}",
            f"{a['step_seconds']:.2f}", f"{a['steps_per_second']:.3f}", f"{a['idle_seconds_per_node']:.1f}",
            f"{sum(a['rounds_ok'])}/{sum(a['rounds_failed'])}", f"{a['round_seconds_median']:.1f}",
        ))  # fmt: skip
    return "\n".join(table_lines(rows))


def run_benchmark(args: argparse.Namespace) -> int:
    from cogen.core.config import GroupConfig

    stale = remove_stale()
    if stale:
        print(f"removed network namespaces left by an earlier run: {', '.join(stale)}", flush=True)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="cogen-wan-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        switch = Switch(3, rate=args.rate).create()
    except NetnsUnavailable as e:
        raise BenchError(str(e)) from None
    try:
        delay = "none (this kernel has no netem)"
        if args.delay_ms > 0 and netem_available(switch):
            for peer in range(3):
                add_delay(switch, peer, args.delay_ms / 2)
            delay = f"{args.delay_ms:g} ms one-way between nodes (netem)"
        print(f"wan benchmark: coordinator + 2 nodes in namespaces, {args.rate} tbf links, delay {delay}; "
              f"{args.model}, LoRA rank {args.lora_rank}, batch {args.batch_size}x{args.block_size}, "
              f"H={args.inner_steps}, {args.rounds} rounds, matchmaking {args.matchmaking_s:g} s; "
              f"logs in {log_dir}", flush=True)  # fmt: skip
        arms: dict[str, dict[str, Any]] = {}
        for i, overlap in enumerate((False, True), start=1):
            name = "overlap" if overlap else "no_overlap"
            print(f"[{i}/2] {name} ...", flush=True)
            arms[name] = summarise(run_arm(switch, args, overlap, log_dir))
    finally:
        switch.remove()
    default = "overlap" if GroupConfig().overlap else "no_overlap"  # the key follows the node's default
    report: dict[str, Any] = {
        "utilisation": arms[default]["utilisation"],
        "utilisation_arm": default,
        "utilisation_overlap": arms["overlap"]["utilisation"],
        "utilisation_no_overlap": arms["no_overlap"]["utilisation"],
        "utilisation_ratio": arms["overlap"]["utilisation"] / arms["no_overlap"]["utilisation"],
        "throughput_ratio": arms["overlap"]["steps_per_second"] / arms["no_overlap"]["steps_per_second"],
    }
    print()
    print(format_table(arms))
    print()
    print(f"utilisation_ratio  {report['utilisation_ratio']:.3f}   (overlap / no overlap)")
    print(f"throughput_ratio   {report['throughput_ratio']:.3f}   (inner steps/s, overlap / no overlap)")
    met = report["utilisation"] >= TARGETS["utilisation"]
    target = TARGETS["utilisation"]
    verdict = "meets target" if met else "MISSES target"
    flag = "--" + default.replace("_", "-")
    print(
        f"utilisation        {report['utilisation']:.3f}   (a node's default, {flag}; >= {target}: {verdict})"
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "url", "out")}
    write_report(args.json, {
        **report, "targets": TARGETS, "meets_targets": {"utilisation": met}, "arms": arms, "delay": delay,
        "settings": {**settings, "log_dir": str(log_dir), "platform": platform.platform()},
    })  # fmt: skip
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--rate", default="100mbit", help="tbf rate of every link (tc syntax)")
    p.add_argument(
        "--delay-ms", type=float, default=50.0, help="one-way delay between nodes, where netem exists"
    )
    p.add_argument("--model", default="smollm2-135m", help="base model of both nodes")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (sets the pseudo-gradient's size)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--inner-steps", type=int, default=5, help="H: inner steps between outer steps")
    p.add_argument("--rounds", type=int, default=5, help="outer rounds per arm (max steps = rounds x H)")
    p.add_argument(
        "--matchmaking-s", type=float, default=10.0,
        help="the nodes' --matchmaking-s: how long a round waits for a groupmate that is late (a loaded CPU "
        "makes the two nodes drift apart)",
    )  # fmt: skip
    p.add_argument("--scrape-s", type=float, default=0.2, help="seconds between scrapes of a node's metrics")
    p.add_argument(
        "--arm-timeout", type=float, default=420.0, help="give up on an arm after this many seconds"
    )
    p.add_argument("--log-dir", default=None, help="keep the processes' logs here (default: a new temp dir)")
    p.add_argument("--worker", choices=("scrape",), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--max-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parse(p, argv)
    for name in ("lora_rank", "batch_size", "block_size", "inner_steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the window needs a round inside it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "scrape":
        scrape(args.url, args.out, args.scrape_s, args.max_s)
        return 0
    return run_main("wan", lambda: run_benchmark(args), plain_logging=True, unwind_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
