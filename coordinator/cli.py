"""``cogen-coordinator``: start (or join) a swarm, watch it and serve its API."""

from __future__ import annotations

import argparse
import threading

from cogen.cli_common import run_main, stop_on_signals
from cogen.config import CoordinatorConfig
from cogen.coordinator.service import Coordinator
from cogen.exit_codes import ExitCode
from cogen.settings import add_config_arguments, build_config
from cogen.telemetry import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogen-coordinator",
        description="Start (or join) a cogen swarm, print the multiaddrs nodes join with, keep a live "
        "view of the swarm and serve it as JSON at /api/swarm.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    add_config_arguments(parser, CoordinatorConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.log_level)
        cfg = build_config(CoordinatorConfig, args)
        stop = threading.Event()
        stop_on_signals(stop)
        Coordinator(cfg, stop).run()
        return ExitCode.OK

    return run_main("cogen-coordinator", body)


if __name__ == "__main__":
    raise SystemExit(main())
