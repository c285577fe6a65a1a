"""What the images run beside cogen itself (stdlib only, so it works before cogen is importable):

``container.py health [URL]``: the HEALTHCHECK. Exit 0 when URL (default: this container's node
``/healthz`` on ``$COGEN_METRICS_PORT``) answers 200 within 4 s, else 1 with one line saying why.

``container.py peers FILE [--wait-s S]``: print, space-separated, the multiaddrs a coordinator wrote to
its ``--ready-file`` FILE, less loopback ones (in another container they point at nothing), waiting up
to S seconds for the file; exit 1 with one line if it does not appear or holds none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = ("/ip4/127.", "/ip6/::1/")


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = int(response.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def _read_peers(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # not there yet, or being written
    found = data.get("initial_peers") if isinstance(data, dict) else None
    if not isinstance(found, list):
        return []
    return [p for p in found if isinstance(p, str) and p.startswith("/") and not p.startswith(LOOPBACK)]


def peers(path: Path, wait_s: float) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        found = _read_peers(path)
        if found:
            print(" ".join(found))
            return 0
        if time.monotonic() >= deadline:
            print(f"no coordinator addresses in {path} after {wait_s:g} s", file=sys.stderr)
            return 1
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="container.py")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("health", help="exit 0 if a /healthz URL answers 200")
    port = os.environ.get("COGEN_METRICS_PORT", "9100")
    check.add_argument("url", nargs="?", default=f"http://127.0.0.1:{port}/healthz")
    join = sub.add_parser("peers", help="print the multiaddrs in a coordinator's --ready-file")
    join.add_argument("file", type=Path)
    join.add_argument("--wait-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.command == "health":
        return health(args.url)
    return peers(args.file, args.wait_s)


if __name__ == "__main__":
    raise SystemExit(main())
