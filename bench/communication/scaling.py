"""Validation loss against (simulated) wall time for a group of 1, 2 and 4 nodes on the same token budget.

Every group size trains the same model (``bench.communication``'s folded-vocabulary Llama) from the
same seeded start on the same total number of tokens: W workers, each on its own shard, run
``total_steps / W`` inner steps, with cogen's outer step (H, outer Nesterov, 8-bit wire) every H of
them; one node trains alone, as cogen's ``solo`` (no outer step).

**Simulated wall time on a 2-core machine.** The workers run one after another in this process, so the
real wall time cannot show a speedup. Each worker's inner steps are timed in CPU time of this process
(one torch thread; robust to other load on the machine), and a round's wall time is modelled as the
slowest worker's compute in that round, plus the measured time of the in-process exchange (every
member's wire trips, the mean and the outer step), plus the bytes one member sends at
``--bandwidth-mbps``. Evaluation is not counted. ``speedup_W`` is the time a single node takes to
reach the target loss for good (default: its own final loss x 1.02; the time from which every later
evaluation stays at or below it) divided by the time the group of W takes; 0 when the group
ends the budget above it.

Run ``python -m bench.communication.scaling --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..harness import BenchError, new_parser, parse, run_main, table_lines, write_report
from .arms import diloco_rounds
from .flags import add_settings_flags, settings_from
from .model import Settings, evaluate, load_data

logger = logging.getLogger("cogen.bench.scaling")


@dataclass
class Curve:
    """One group size's validation loss against simulated wall time (and against tokens)."""

    workers: int
    points: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, tokens, loss)
    compute_seconds: float = 0.0
    exchange_seconds: float = 0.0
    real_seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.points[-1][2]

    def time_to(self, target: float) -> float:
        """Simulated seconds from which the loss stays at or below ``target`` (linear between the
        evaluations around the last crossing; the curve wanders with the data, so a first dip would
        flatter a noisy run); ``inf`` if the final loss is above it."""
        above = [i for i, (_, _, loss) in enumerate(self.points) if loss > target]
        if not above:
            return self.points[0][0]
        i = above[-1]
        if i == len(self.points) - 1:
            return math.inf
        (t0, _, l0), (t1, _, l1) = self.points[i], self.points[i + 1]
        return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)


def run_group(s: Settings, workers: int, total_steps: int, bandwidth_mbps: float) -> Curve:
    """Train a group of ``workers`` on ``total_steps`` inner steps in all; evaluate after every round."""
    start = time.perf_counter()
    steps = total_steps // workers
    ws = dataclasses.replace(s, workers=workers)
    data = load_data(ws, steps, workers)
    curve = Curve(workers)
    tokens_per_step = workers * s.batch_size * s.block_size
    clock = 0.0
    for rnd in diloco_rounds(ws, data, steps):
        network = rnd.bytes_sent * 8 / (bandwidth_mbps * 1e6)
        exchange = rnd.averaging_seconds + network if workers > 1 else 0.0
        clock += rnd.compute_seconds + exchange
        curve.compute_seconds += rnd.compute_seconds
        curve.exchange_seconds += exchange
        loss = evaluate(rnd.model, data.validation)
        curve.points.append((clock, rnd.done * tokens_per_step, loss))
        logger.info(
            "%d worker(s): step %d/%d, simulated %.1f s, validation loss %.4f",
            workers,
            rnd.done,
            steps,
            clock,
            loss,
        )
    curve.real_seconds = time.perf_counter() - start
    return curve


def figures(curves: dict[int, Curve], target_factor: float) -> dict[str, Any]:
    """``speedup_W`` for every group size, and the target they were measured against."""
    solo = curves[1]
    target = solo.final_loss * target_factor
    t1 = solo.time_to(target)
    out: dict[str, Any] = {"target_loss": target}
    for w, curve in curves.items():
        tw = curve.time_to(target)
        out[f"time_to_target_{w}"] = tw if math.isfinite(tw) else None
        out[f"final_loss_{w}"] = curve.final_loss
        if w > 1:
            out[f"speedup_{w}"] = t1 / tw if math.isfinite(tw) else 0.0
    # context: the worst final loss of all sizes, which every curve reaches by its end
    common = max(c.final_loss for c in curves.values())
    out["common_target_loss"] = common
    for w, curve in curves.items():
        if w > 1:
            out[f"speedup_common_{w}"] = solo.time_to(common) / curve.time_to(common)
    return out


def format_report(curves: dict[int, Curve], f: dict[str, Any], bandwidth_mbps: float) -> str:
    rows = [("nodes", "final val loss", "sim. time to target", "speedup", "sim. wall", "exchange", "real s")]
    for w, c in curves.items():
        t = f[f"time_to_target_{w}"]
        speed = "1.00" if w == 1 else f"{f[f'speedup_{w}']:.2f}"
        rows.append(
            (str(w), f"{c.final_loss:.4f}", "not reached" if t is None else f"{t:.1f} s", speed,
             f"{c.points[-1][0]:.1f} s", f"{c.exchange_seconds:.2f} s", f"{c.real_seconds:.0f}")
        )  # fmt: skip
    lines = table_lines(rows, left=())
    lines += [
        "",
        "SIMULATED wall time on a 2-core machine: per round, the slowest worker's measured compute",
        f"+ the measured in-process exchange + one member's bytes at {bandwidth_mbps:g} Mbit/s "
        "(evaluation not counted).",
        f"target loss {f['target_loss']:.4f} (1 node's final loss x factor); "
        + ", ".join(f"{k} {v:.2f}" for k, v in f.items() if k.startswith("speedup_") and "common" not in k),
        f"at the worst final loss of all sizes, {f['common_target_loss']:.4f}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in f.items() if k.startswith("speedup_common_")),
    ]
    return "\n".join(lines)


def run_benchmark(s: Settings, args: argparse.Namespace) -> int:
    torch.set_num_threads(s.threads)
    sizes = sorted({1, *args.sizes})
    for w in sizes:
        if args.total_steps % w or (args.total_steps // w) % 2:
            raise BenchError(f"--total-steps must split into an even number of steps for {w} workers")
    print(
        f"scaling benchmark: groups of {', '.join(map(str, sizes))} on {args.total_steps} inner steps in all "
        f"(batch {s.batch_size}x{s.block_size}), H={s.inner_steps}; SIMULATED wall time (see --help)",
        flush=True,
    )
    curves: dict[int, Curve] = {}
    for i, w in enumerate(sizes, 1):
        print(f"[{i}/{len(sizes)}] {w} node(s), {args.total_steps // w} steps each ...", flush=True)
        curves[w] = run_group(s, w, args.total_steps, args.bandwidth_mbps)
    report = figures(curves, args.target_factor)
    shared = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("steps", "workers")}
    print()
    print(format_report(curves, report, args.bandwidth_mbps), flush=True)
    write_report(args.json, {
        **report,
        "simulated": "wall time modelled from per-worker compute time on a 2-core machine",
        "curves": {str(w): c.points for w, c in curves.items()},
        "settings": {**shared,
                     "total_steps": args.total_steps, "sizes": sizes,
                     "target_factor": args.target_factor, "bandwidth_mbps": args.bandwidth_mbps,
                     "torch": torch.__version__, "platform": platform.platform()},
    })  # fmt: skip
    return 0


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = new_parser(__doc__)
    add_settings_flags(parser, Settings(), skip=("steps", "workers"))
    parser.set_defaults(eval_blocks=96)  # evaluated after every round: a smaller set than communication.py
    parser.add_argument("--total-steps", type=int, default=1600, help="inner steps of all workers together")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="group sizes (1 always runs)")
    parser.add_argument(
        "--target-factor", type=float, default=1.02, help="target = 1 node's final loss x this"
    )
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="link speed for the bytes sent")
    args = parse(parser, argv)
    if args.total_steps < 2 or any(w < 1 for w in args.sizes) or args.bandwidth_mbps <= 0:
        parser.error("--total-steps, --sizes and --bandwidth-mbps must be positive")
    return settings_from(args, parser), args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    return run_main("scaling", lambda: run_benchmark(settings, args))


if __name__ == "__main__":
    sys.exit(main())
