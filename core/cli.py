"""``cogen``: the umbrella command (``cogen demo``; ``cogen node`` and ``cogen coordinator`` forward)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cogen.cli_common import register_failure, run_main
from cogen.exit_codes import ExitCode
from cogen.procs import ChildFailed
from cogen.telemetry import setup_logging

register_failure(ChildFailed, ExitCode.ERROR, "demo")

#: model -> (training seconds, batch size, learning rate, extra LoRA targets) that fit the demo's time
#: budget on 2 CPU cores. The tiny model's final RMSNorm and small random embeddings cap its logits near
#: uniform, so its experts also adapt the output projection (lm_head) to learn anything in seconds.
DEMO_PRESETS: dict[str, tuple[float, int, float, tuple[str, ...]]] = {
    "tiny": (12.0, 8, 2e-2, ("lm_head",)),
    "smollm2-135m": (240.0, 4, 2e-3, ()),
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
        "--domains", nargs="+", default=["medical", "legal", "code"], help="one node per domain"
    )
    demo.add_argument(
        "--seconds", type=float, default=None, help="training time per node (default: per model)"
    )
    demo.add_argument("--precision", choices=["int8", "bf16", "fp32"], default="int8")
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
    parser = argparse.ArgumentParser(
        prog="cogen",
        description="cogen: train a foundation model as a model over "
        "models. Commands: demo, node (= cogen-node), coordinator (= cogen-coordinator).",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    sub.add_parser("node", help="run a node (see cogen-node --help)")
    sub.add_parser("coordinator", help="run a coordinator (see cogen-coordinator --help)")
    args = parser.parse_args(argv)

    def body() -> int:
        from cogen.demo import DemoOptions, run_demo

        setup_logging(args.log_level)
        seconds, batch, lr, extra_targets = DEMO_PRESETS.get(args.model, DEMO_PRESETS["smollm2-135m"])
        if args.seconds is not None and args.seconds <= 0:
            parser.error("--seconds must be positive")
        run_demo(
            DemoOptions(
                model=args.model,
                domains=tuple(args.domains),
                train_seconds=args.seconds or seconds,
                precision=args.precision,
                batch_size=args.batch_size or batch,
                lr=args.lr or lr,
                out_dir=args.out_dir,
                json_path=args.json_path,
                extra_lora_targets=extra_targets,
            )
        )
        return ExitCode.OK

    return run_main("cogen", body)


if __name__ == "__main__":
    raise SystemExit(main())
