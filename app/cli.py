"""``cogen``: the umbrella command (``cogen demo``; ``cogen node``, ``cogen coordinator``,
``cogen dashboard`` and ``cogen swarm`` forward)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from cogen.core.cli_common import run_main
from cogen.core.exit_codes import ExitCode
from cogen.core.telemetry import setup_logging


@dataclass(frozen=True)
class DemoPreset:
    """Demo settings that fit its time budget on 2 CPU cores."""

    seconds: float
    batch_size: int
    lr: float
    inner_steps: int
    # the tiny model's final RMSNorm and small random embeddings cap its logits near uniform, so its
    # experts also adapt the output projection (lm_head) to learn anything within seconds
    extra_lora_targets: tuple[str, ...] = ()
    # with the demo's few inner steps per outer step, DiLoCo's outer Nesterov (lr 0.7, momentum 0.9,
    # tuned for H in the hundreds) overshoots; plain averaging of the members' weights does not
    outer_lr: float = 1.0
    eval_blocks: int = 16  # validation blocks per domain, for the table and the coordinator's ranking
    outer_momentum: float = 0.0


DEMO_PRESETS = {
    "tiny": DemoPreset(
        seconds=30.0, eval_blocks=4, batch_size=8, lr=2e-2, inner_steps=2, extra_lora_targets=("lm_head",)
    ),
    "smollm2-135m": DemoPreset(seconds=240.0, batch_size=4, lr=2e-3, inner_steps=8, eval_blocks=4),
}


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a coordinator and one node per domain here, then compare base and experts",
        description="Start a coordinator and one node per domain as processes on 127.0.0.1, "
        "train for a bounded time, then print each domain's validation loss for the base "
        "and for that domain's expert.",
    )
    demo.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id"
    )
    demo.add_argument(
        "--domains",
        nargs="+",
        default=["medical", "medical", "legal", "code"],
        help="one node per entry; a domain listed twice trains as a group of two nodes",
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="training time, split evenly over the generations (default: per model)",
    )
    demo.add_argument("--precision", choices=["int8", "bf16", "fp32"], default="int8")
    demo.add_argument(
        "--generations", type=int, default=2, help="how many times the experts are merged into a new base"
    )
    demo.add_argument("--merge-method", default="linear", help="how the coordinator merges the experts")
    demo.add_argument(
        "--fuse",
        action="store_true",
        help="merge with fuse, and add a node on another model (tiny; tiny-smol in a tiny swarm) that trains "
        "a foreign expert on the last domain: each generation is fused from it too",
    )
    demo.add_argument("--batch-size", type=int, default=None)
    demo.add_argument("--lr", type=float, default=None)
    demo.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="logs and expert checkpoints")
    demo.add_argument("--json", type=Path, default=None, dest="json_path", help="also write the results here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:
        from cogen.node.cli import main as node_main

        return node_main(argv[1:])
    if argv[:1] == ["coordinator"]:
        from cogen.coordinator.cli import main as coordinator_main

        return coordinator_main(argv[1:])
    if argv[:1] == ["verify"]:
        from cogen.app.verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["swarm"]:
        from cogen.app.swarm import main as swarm_main

        return swarm_main(argv[1:])
    if argv[:1] == ["dashboard"]:
        from cogen.coordinator.cli import dashboard_main

        return dashboard_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="cogen",
        description="cogen: train a foundation model as a model over "
        "models. Commands: demo, node (= cogen-node), coordinator (= cogen-coordinator), "
        "dashboard (watch a swarm read-only), verify (check a published generation), swarm (a permissioned "
        "swarm's keys and credentials).",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    sub.add_parser("node", help="run a node (see cogen-node --help)")
    sub.add_parser("coordinator", help="run a coordinator (see cogen-coordinator --help)")
    sub.add_parser("dashboard", help="watch a swarm as a read-only observer (see cogen dashboard --help)")
    sub.add_parser("verify", help="check a published generation, --recompute its merge (cogen verify --help)")
    sub.add_parser(
        "swarm", help="owner key, credentials, revocations of a permissioned swarm (cogen swarm -h)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from cogen.app.demo import DemoOptions, run_demo

        setup_logging(args.log_level)
        preset = DEMO_PRESETS.get(args.model, DEMO_PRESETS["smollm2-135m"])
        if args.seconds is not None and args.seconds <= 0:
            parser.error("--seconds must be positive")
        run_demo(
            DemoOptions(
                model=args.model,
                domains=tuple(args.domains),
                train_seconds=args.seconds or preset.seconds,
                precision=args.precision,
                batch_size=args.batch_size or preset.batch_size,
                lr=args.lr or preset.lr,
                inner_steps=preset.inner_steps,
                outer_lr=preset.outer_lr,
                outer_momentum=preset.outer_momentum,
                out_dir=args.out_dir,
                json_path=args.json_path,
                extra_lora_targets=preset.extra_lora_targets,
                eval_blocks=preset.eval_blocks,
                generations=args.generations,
                merge_method="fuse" if args.fuse else args.merge_method,
                fuse=args.fuse,
            )
        )
        return ExitCode.OK

    return run_main("cogen", body)


if __name__ == "__main__":
    raise SystemExit(main())
