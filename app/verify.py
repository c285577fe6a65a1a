"""``cogen verify GEN_DIR``: check a published generation; with ``--recompute``, also its arithmetic.

Without ``--recompute`` it checks what a node checks before it trains on a base: the manifest's
signature (by ``--trusted-key``, if given), every file's size and sha256. With it, it re-runs the dense
merge from the manifest and the experts' checkpoints and compares every published tensor
(:mod:`cogen.coordinator.merging.recompute`). Exit 0 when everything holds, 6 with one line naming the
first thing that does not.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cogen.core.cli_common import run_main
from cogen.core.exit_codes import ExitCode
from cogen.core.telemetry import setup_logging

logger = logging.getLogger("cogen")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cogen verify",
        description="Check a published generation: its signature and files, and with --recompute that its "
        "weights are what the manifest's merge of the experts gives.",
    )
    p.add_argument(
        "gen_dir", type=Path, metavar="GEN_DIR", help="a generation directory (with manifest.json)"
    )
    p.add_argument(
        "--trusted-key", default=None, help="public key (OpenSSH text, or a file) that must have signed it"
    )
    p.add_argument("--recompute", action="store_true", help="re-run the merge and compare every tensor")
    p.add_argument(
        "--experts",
        nargs="*",
        type=Path,
        default=[],
        metavar="DIR",
        help="the experts' checkpoints (matched to the manifest's experts by sha256), for --recompute",
    )
    p.add_argument(
        "--parent", type=Path, default=None, help="the parent base's directory (default: from the manifest)"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are cached")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (env COGEN_LOG_LEVEL)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.recompute and not args.experts:
        parser().error("--recompute needs the experts' checkpoints: --experts DIR [DIR ...]")

    def body() -> int:
        from cogen.coordinator.merging.recompute import RecomputeError, recompute
        from cogen.node.follow import read_key
        from cogen.protocols.manifest import verify_manifest

        setup_logging(args.log_level)
        key = read_key(args.trusted_key)
        if not args.recompute:
            manifest = verify_manifest(args.gen_dir, key)
            print(f"generation {manifest.generation}: signature and {len(manifest.files)} files verify")
            return ExitCode.OK
        found = recompute(
            args.gen_dir, args.experts, parent=args.parent, trusted_key=key, cache_dir=args.cache_dir
        )
        for problem in found.problems:
            logger.error("%s", problem)
        if found.problems:
            raise RecomputeError(found.problems[-1])
        how = (
            "bit-identical"
            if found.exact
            else f"within tolerance (largest deviation {found.max_deviation:.3g})"
        )
        print(f"generation {found.generation}: recomputed, {found.tensors} tensors {how}")
        return ExitCode.OK

    return run_main("cogen verify", body)
