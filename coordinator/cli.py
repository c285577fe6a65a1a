"""``cogen-coordinator``: start (or join) a swarm, watch it and serve its dashboard, API and metrics.

``cogen dashboard`` runs the same service as a read-only observer peer (:func:`dashboard_main`).
``cogen-coordinator merge ...`` merges expert checkpoints on disk into a new base, offline
(:func:`merge_main`).
"""

from __future__ import annotations

import argparse
import sys
import threading

from cogen.coordinator.config import CoordinatorConfig, MergeConfig
from cogen.core.cli_common import run_main, stop_on_signals
from cogen.core.exit_codes import ExitCode
from cogen.core.settings import ConfigError, add_config_arguments, build_config
from cogen.core.telemetry import setup_logging


def build_parser(observer: bool = False) -> argparse.ArgumentParser:
    if observer:
        parser = argparse.ArgumentParser(
            prog="cogen dashboard",
            description="Watch a running cogen swarm as a read-only observer peer (a DHT client that "
            "announces nothing) and serve its dashboard at http://API_HOST:API_PORT/, the JSON API "
            "under /api/ and Prometheus metrics at /metrics.",
        )
    else:
        parser = argparse.ArgumentParser(
            prog="cogen-coordinator",
            description="Start (or join) a cogen swarm, print the multiaddrs nodes join with, keep a "
            "live view of the swarm and serve its dashboard at http://API_HOST:API_PORT/, the JSON "
            "API under /api/ and Prometheus metrics at /metrics.",
        )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    add_config_arguments(parser, CoordinatorConfig)
    return parser


def _run(argv: list[str] | None, observer: bool) -> int:
    command = "cogen dashboard" if observer else "cogen-coordinator"
    args = build_parser(observer).parse_args(argv)

    def body() -> int:
        setup_logging(args.log_level)
        if observer:
            cfg = build_config(CoordinatorConfig, args, observer=True)
        else:
            cfg = build_config(CoordinatorConfig, args)
        if cfg.view.observer and not cfg.network.initial_peers:
            raise ConfigError("--initial-peers: an observer needs the multiaddr of a peer in the swarm")
        from cogen.coordinator.service import Coordinator  # torch and hivemind: not for --help or a bad flag

        stop = threading.Event()
        stop_on_signals(stop)
        Coordinator(cfg, stop).run()
        return ExitCode.OK

    return run_main(command, body)


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogen-coordinator merge",
        description="Merge expert checkpoints on disk into a new base, offline: verify the experts, "
        "optionally evaluate the base and each expert on domains' validation splits (their weights then "
        "come from the ranking), merge their LoRA deltas with a method (dare, dare_ties, linear, ties), "
        "and publish OUT/generations/gen-N (a Hugging Face checkpoint plus a signed manifest.json) with "
        "OUT/latest pointing at it.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    add_config_arguments(parser, MergeConfig)
    return parser


def merge_main(argv: list[str] | None = None) -> int:
    """``cogen-coordinator merge``: parse, build :class:`MergeConfig`, run ``merge_experts``."""
    args = build_merge_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.log_level)
        from cogen.coordinator.merging import merge_experts
        from cogen.protocols.manifest import read_manifest

        final = merge_experts(build_config(MergeConfig, args))
        print(f"published generation {read_manifest(final).generation} at {final}", flush=True)
        return ExitCode.OK

    return run_main("cogen-coordinator merge", body)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["merge"]:
        return merge_main(args[1:])
    return _run(argv, observer=False)


def dashboard_main(argv: list[str] | None = None) -> int:
    """``cogen dashboard``: the coordinator's view, API and metrics as a read-only observer."""
    return _run(argv, observer=True)


if __name__ == "__main__":
    raise SystemExit(main())
