"""Chaos: a swarm across namespace hosts that loses nodes, its coordinator and a link, against a calm run.

Eight hosts on 100 Mbit/s links (``cogen.core.netns``): the coordinator on host 0 (generations every
``--generation-s``), two groups of two (``medical`` on hosts 1-2, ``legal`` on 3-4), a node alone on
``code`` (host 5), and a late ``medical`` joiner (host 6) that starts a third of the way in; tiny
model, same seed and length in both arms. The disturbed arm, in order:

1. SIGKILL a random node every ``--kill-every-s`` (restarted ``--restart-after-s`` later with the same
   output dir; one kill with ``--quick``);
2. SIGTERM a node mid-round (its groupmate is SIGSTOPped so the round hangs) and restart it;
3. SIGKILL the coordinator while it collects or merges a generation, and restart it;
4. cut one host off for ``--partition-s``, then reconnect it;
5. start the late joiner and SIGKILL the groupmate it downloads the group's state from.

The undisturbed arm starts the late joiner at the same time and disturbs nothing. Figures (from the
processes' logs and the published generations): ``rounds_attempted``, ``rounds_applied``,
``rounds_failed_detected``, ``nan_events`` (must be 0), ``generations_published``,
``generations_intact`` (all verify), ``nodes_on_latest_at_end`` (all), ``max_recovery_s`` (restart to
first applied outer step; a solo node: first inner step), ``loss_ratio`` (disturbed / undisturbed
final mean training loss over the nodes; target <= 1.10), ``sigterm_exit_s`` (target <= 25).

The disturbances are ``chaos_events.py``, the swarm and its logs ``chaos_swarm.py``.

Run ``python -m bench.swarm.chaos --quick``; needs root. ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cogen.core.netns import NetnsUnavailable, Switch, remove_stale
from cogen.core.procs import wait_for

from ..harness import BenchError, new_parser, parse, run_main, table_lines, targets_json, write_report
from .chaos_events import Disturber
from .chaos_swarm import ChaosSwarm, LogFacts, Member

logger = logging.getLogger("cogen.bench.chaos")
TARGETS = {"nan_events": ("<=", 0.0), "loss_ratio": ("<=", 1.10), "sigterm_exit_s": ("<=", 25.0)}
ON_GENERATION = re.compile(r"(?:training on|resumed) generation (\d+)")
NODES = {"med-a": (1, "medical"), "med-b": (2, "medical"), "law-a": (3, "legal"), "law-b": (4, "legal"),
         "code": (5, "code"), "late": (6, "medical")}  # fmt: skip


def node_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model", "tiny", "--block-size", "32", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1",
        "--threads", "1", "--log-interval-s", "2", "--record-ttl-s", "15", "--num-shards", "8",
        "--inner-steps", str(args.inner_steps), "--matchmaking-s", "2", "--averaging-timeout-s", "20",
        "--seed", str(args.seed), "--grace-s", "25", "--checkpoint-every", "4",
    ]  # fmt: skip


def coordinator_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model", "tiny", "--generation-s", str(args.generation_s), "--eval-blocks", "2",
        "--eval-block-size", "32", "--router-blocks", "2", "--collect-timeout-s", "30",
        "--poll-interval-s", "1", "--record-ttl-s", "15",
    ]  # fmt: skip


def run_arm(switch: Switch, args: argparse.Namespace, disturbed: bool, workdir: Path) -> dict[str, Any]:
    swarm = ChaosSwarm(switch, workdir, node_args(args), coordinator_args(args))
    for name, (host, expert) in NODES.items():
        swarm.add(name, host, expert)
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    disturber = Disturber(swarm, args, deadline)
    try:
        swarm.start_coordinator()
        for name, member in swarm.members.items():
            if name != "late":
                swarm.start(member)
        time.sleep(args.warmup_s)
        if disturbed:
            disturber.run()
        else:
            swarm.start(swarm.members["late"])
        while time.monotonic() < deadline:
            time.sleep(1.0)
        latest = wait_for_latest(swarm, args)
        figures = figures_of(swarm, disturber, latest)
        figures["seconds"] = round(time.monotonic() - t0, 1)
        figures["events"] = disturber.events
        figures["scenarios_failed"] = disturber.failed
        return figures
    finally:
        codes = swarm.stop_all()
        logger.info("%s arm: exit codes %s", "disturbed" if disturbed else "undisturbed", codes)


def _published(out: Path) -> list[Path]:
    return sorted(p for p in (out / "generations").glob("gen-*") if p.name[4:].isdigit())


def wait_for_latest(swarm: ChaosSwarm, args: argparse.Namespace) -> int:
    """Give the nodes ``--settle-s`` to move to the newest published generation; returns its number."""
    gens = _published(swarm.out_dir)
    latest = int(gens[-1].name[4:]) if gens else 0

    def all_on_latest() -> bool:
        return all(on_generation(m) >= latest for m in swarm.members.values() if m.alive)

    try:
        wait_for(all_on_latest, args.settle_s, f"every node on generation {latest}", interval_s=1.0)
    except RuntimeError as e:
        logger.warning("%s", e)
    return latest


def on_generation(member: Member) -> int:
    """The generation a node trains on now: the newest its latest start moved to or resumed on."""
    if not member.logs or not member.logs[-1].exists():
        return 0
    return max(map(int, ON_GENERATION.findall(member.logs[-1].read_text(errors="replace"))), default=0)


def figures_of(swarm: ChaosSwarm, disturber: Disturber, latest: int) -> dict[str, Any]:
    from cogen.protocols.manifest import ManifestError, verify_manifest

    facts = [f for m in swarm.members.values() for f in swarm.facts(m)]
    intact = 0
    gens = _published(swarm.out_dir)
    for gen in gens:
        try:
            verify_manifest(gen)
            intact += 1
        except (ManifestError, OSError, ValueError) as e:
            logger.warning("%s does not verify: %s", gen.name, e)
    recoveries = [
        swarm.recovery_s(member, index, solo=member.expert == "code") for member, index in disturber.restarts
    ]
    final = [statistics.fmean(loss for _, loss in f.losses[-5:]) for f in
             (LogFacts.read(m.logs[-1]) for m in swarm.members.values() if m.logs) if f.losses]  # fmt: skip
    return {
        "rounds_attempted": sum(len(f.applied) + len(f.skipped) for f in facts),
        "rounds_applied": sum(len(f.applied) for f in facts),
        "rounds_failed_detected": sum(len(f.skipped) for f in facts),
        "nan_events": sum(f.non_finite for f in facts),
        "generations_published": len(gens),
        "generations_intact": intact,
        "latest_generation": latest,
        "nodes": len(swarm.members),
        "nodes_on_latest_at_end": sum(on_generation(m) >= latest for m in swarm.members.values() if m.alive),
        "max_recovery_s": max((r for r in recoveries if r is not None), default=None),
        "recoveries_missing": sum(r is None for r in recoveries),
        "final_mean_loss": statistics.fmean(final) if final else None,
        "sigterm_exit_s": max(disturber.sigterm_exit_s, default=None),
    }


def report(calm: dict[str, Any], chaos: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ratio = None
    if calm["final_mean_loss"] and chaos["final_mean_loss"] is not None:
        ratio = chaos["final_mean_loss"] / calm["final_mean_loss"]
    keys = ["rounds_attempted", "rounds_applied", "rounds_failed_detected", "nan_events",
            "generations_published", "generations_intact", "nodes_on_latest_at_end", "max_recovery_s",
            "final_mean_loss", "sigterm_exit_s"]  # fmt: skip
    rows = [["figure", "undisturbed", "disturbed"]]
    for key in keys:
        rows.append([key, _fmt(calm.get(key)), _fmt(chaos.get(key))])
    rows.append(["loss_ratio", "", _fmt(ratio)])
    print("\n".join(table_lines(rows)))
    for event in chaos["events"]:
        print(f"  {event}")
    for failed in chaos["scenarios_failed"]:
        print(f"  FAILED {failed}")
    return {
        **{k: chaos.get(k) for k in keys},
        "nodes": chaos["nodes"],
        "scenarios_failed": chaos["scenarios_failed"],
        "loss_ratio": ratio,
        "undisturbed": calm,
        "disturbed": chaos,
        "targets": targets_json(TARGETS),
        "quick": args.quick,
        "seconds": args.seconds,
        "command": " ".join(sys.argv),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    try:
        remove_stale()
        switch = Switch(len(NODES) + 1, rate=args.rate).create()
    except NetnsUnavailable as e:
        raise BenchError(str(e)) from None
    root = Path(args.log_dir or tempfile.mkdtemp(prefix="cogen-chaos-"))
    try:
        arms = {}
        for disturbed in (False, True):
            name = "disturbed" if disturbed else "undisturbed"
            logger.info("%s arm: %.0f s (logs in %s)", name, args.seconds, root / name)
            arms[name] = run_arm(switch, args, disturbed, root / name)
        write_report(args.json, report(arms["undisturbed"], arms["disturbed"], args))
    finally:
        switch.remove()
        if args.log_dir is None and not args.keep_logs:
            shutil.rmtree(root, ignore_errors=True)
    return 0


#: what ``--quick`` sets (flags given explicitly still win)
QUICK = {"seconds": 300.0, "generation_s": 60.0, "partition_s": 30.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__, {"quick": ("one pass of each scenario, shorter run", QUICK)})
    p.add_argument("--seconds", type=float, default=None, help="length of each arm (default 600; quick 300)")
    p.add_argument("--generation-s", type=float, default=None, help="coordinator --generation-s (default 90)")
    p.add_argument("--kill-every-s", type=float, default=30.0)
    p.add_argument("--kill-phase-s", type=float, default=120.0, help="how long random kills go on")
    p.add_argument("--restart-after-s", type=float, default=10.0)
    p.add_argument("--partition-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=20.0, help="undisturbed seconds before the first event")
    p.add_argument("--settle-s", type=float, default=120.0, help="time to reach the last generation")
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--joiner-rate", default="256kbit", help="the late joiner's link while it downloads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None, help="keep every process's log here")
    p.add_argument("--keep-logs", action="store_true")
    args = parse(p, argv)
    args.seconds = args.seconds or 600.0
    args.generation_s = args.generation_s or 90.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("chaos", lambda: run(args), plain_logging=True, unwind_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
