"""``cogen-node``: join a swarm and train a domain expert."""

from __future__ import annotations

import argparse
import threading

from cogen.core.cli_common import exit_after_grace, run_main, stop_on_signals
from cogen.core.config import NodeConfig
from cogen.core.exit_codes import ExitCode
from cogen.core.settings import add_config_arguments, build_config
from cogen.core.telemetry import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogen-node",
        description="Join a cogen swarm and train a domain expert: 8-bit base + LoRA, 8-bit optimizer. "
        "SIGTERM or Ctrl+C stops it within --grace-s, even mid-round, with its adapter and training state "
        "saved; restarted with the same --output-dir it resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    add_config_arguments(parser, NodeConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.log_level)
        from cogen.node.service import ExpertNode  # torch and hivemind: not for --help or a bad flag

        cfg = build_config(NodeConfig, args)
        stop = threading.Event()
        stop_on_signals(stop)
        exit_after_grace(stop, cfg.grace_s, "cogen-node")
        ExpertNode(cfg, stop).run()
        return ExitCode.OK

    return run_main("cogen-node", body)


if __name__ == "__main__":
    raise SystemExit(main())
