"""The averaging benchmark's parent side: starting the peers, timed rounds among them, per wire format.

:func:`measure_floor` times a raw TCP copy of the same bytes; :func:`start_peers` starts ``n`` peer
workers (:mod:`.children`); :func:`run_configs` runs every wire format among them: per format one
warm-up and ``--rounds`` measured rounds of a bare hivemind averager, then the same of cogen's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .children import Child, Route, worker_cmd
from .workers import BenchError


class PartialResult(BenchError):
    """A configuration failed part-way; ``rounds`` holds what was measured before."""

    def __init__(self, rounds: Rounds, cause: BenchError):
        super().__init__(str(cause))
        self.rounds = rounds


def measure_floor(path: Route, nbytes: int, rounds: int, tmp: Path) -> list[float]:
    """Seconds to send ``nbytes`` from peer 0 to peer 1 over a plain TCP socket (after one warm-up)."""
    count = ["--bytes", str(nbytes), "--count", str(rounds + 1)]
    recv = Child(
        "floor receiver",
        worker_cmd(path, 1, "--worker", "floor-recv", "--host", path.host(1), *count),
        tmp / f"{path.name}-floor-recv.log",
    )
    send: Child | None = None
    try:
        port = recv.reply(60, "start")["port"]
        target = f"{path.host(1)}:{port}"
        send = Child(
            "floor sender",
            worker_cmd(path, 0, "--worker", "floor-send", "--target", target, *count),
            tmp / f"{path.name}-floor-send.log",
        )
        seconds: list[float] = send.reply(60 + 30 * (rounds + 1), "the copies")["seconds"]
        return seconds[1:]
    finally:
        for child in (send, recv):
            if child is not None:
                child.close()


def threads_per_peer(args: argparse.Namespace, n: int) -> int:
    """Compute threads of each peer process (and its averagers): ``--threads-per-peer``, or its
    share of this machine's cores. Peers stand for separate machines; if each ran as many threads
    as there are cores, OpenMP's spinning threads would starve each other and every other process,
    and a round would time the oversubscription rather than the averaging."""
    return args.threads_per_peer or max(1, (os.cpu_count() or 1) // n)


def threads_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def start_peers(path: Route, n: int, args: argparse.Namespace, tmp: Path) -> list[Child]:
    """Start ``n`` peer processes; the first one's DHT addresses are every other's initial peers."""
    common = [
        "--worker",
        "peer",
        "--peers",
        str(n),
        "--size-mb",
        str(args.size_mb),
        "--round-timeout",
        str(args.round_timeout),
    ]
    children: list[Child] = []
    try:
        maddrs: list[str] = []
        for i in range(n):
            flags = [
                *common,
                "--index",
                str(i),
                "--host",
                path.host(i),
                "--initial-peers",
                json.dumps(maddrs),
            ]
            children.append(
                Child(
                    f"peer {i}",
                    worker_cmd(path, i, *flags),
                    tmp / f"{path.name}-{n}-{i}.log",
                    env=threads_env(threads_per_peer(args, n)),
                )
            )
            if i == 0:
                maddrs = children[0].reply(120, "start")["maddrs"]
        for child in children[1:]:
            child.reply(120, "start")
    except BaseException:
        for child in children:
            child.close(grace_s=5.0)
        raise
    return children


def _collect(children: list[Child], timeout: float, what: str, start_at: float) -> list[dict[str, Any]]:
    """Every child's answer, in order. Once one has answered, the others get ``max(30 s, twice its
    time)``: a peer whose averager process died would never answer."""
    replies: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(children):
        for i, child in enumerate(children):
            if i not in replies and (reply := child.poll_reply(what)) is not None:
                replies[i] = reply
                if len(replies) == 1:
                    grace = max(30.0, 2 * (reply["end"] - start_at))
                    deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            late = next(child for i, child in enumerate(children) if i not in replies)
            raise BenchError(f"{late.name}: no answer to {what} in time\n{late.tail()}")
        time.sleep(0.01)
    return [replies[i] for i in range(len(children))]


def _round(children: list[Child], kind: str, seed: int, timeout: float) -> tuple[float, bool, str]:
    """One round: prepare (untimed), a common start 0.3 s later; returns (seconds, whole, why not)."""
    for child in children:
        child.send(cmd="prepare", kind=kind, seed=seed)
    for child in children:
        child.reply(120, "prepare")
    start_at = time.time() + 0.3
    for child in children:
        child.send(cmd="go", kind=kind, start_at=start_at)
    replies = _collect(children, timeout, f"a {kind} round", start_at)
    whole = all(r["ok"] and r["group_size"] == len(children) for r in replies)
    reasons = sorted({r["reason"] or f"group of {r['group_size']}" for r in replies if not whole})
    return max(r["end"] for r in replies) - start_at, whole, "; ".join(reasons)


@dataclass
class Rounds:
    """Seconds of the whole measured rounds of each kind, and why the others were not whole."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"cogen": [], "bare": []})
    failed: list[str] = field(default_factory=list)
    error: str | None = None  # one line
    log_tail: str = ""  # the end of the failing worker's log


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_rounds(children: list[Child], compression: str, args: argparse.Namespace, label: str) -> Rounds:
    """One warm-up round and ``rounds`` measured ones of each kind; keeps the whole ones.

    A failure (a peer that stops answering) ends the configuration but keeps what was measured."""
    for child in children:
        child.send(cmd="setup", compression=compression)
    for child in children:
        child.reply(120, "setup")
    rounds = Rounds()
    try:
        _run_schedule(children, args, label, rounds)
    except BenchError as e:
        rounds.error, _, rounds.log_tail = str(e).partition("\n")
        raise PartialResult(rounds, e) from e
    for child in children:
        child.send(cmd="teardown")
    for child in children:
        child.reply(120, "teardown")
    return rounds


def _run_schedule(children: list[Child], args: argparse.Namespace, label: str, rounds: Rounds) -> None:
    # bare hivemind first: a cogen failure that kills the peers' averagers then loses no bare figure
    schedule = [(kind, i > 0) for kind in ("bare", "cogen") for i in range(args.rounds + 1)]
    from cogen.core.config import GroupConfig

    # a cogen round gives up looking for a group after 2 * matchmaking + 5 s, then all-reduces
    timeout = args.round_timeout + 2 * GroupConfig().matchmaking_s + 5 + 30
    for seed, (kind, measured) in enumerate(schedule, 1):
        took, whole, why = _round(children, kind, seed, timeout)
        tag = "measured" if measured else "warm-up"
        verdict = "" if whole else f" — NOT WHOLE: {why}"
        print(f"    {label}: {kind} round {seed}/{len(schedule)} ({tag}) {took:.2f} s{verdict}", flush=True)
        if measured and whole:
            rounds.seconds[kind].append(took)
        elif measured:
            rounds.failed.append(f"{kind}: {why}")


def run_configs(path: Route, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Rounds]:
    """Every wire format for ``n`` peers on ``path``; the peers are restarted only after a failure."""
    results: dict[str, Rounds] = {}
    children: list[Child] = []
    try:
        for compression in args.compressions:
            label = f"{path.name} {n} peers {compression}"
            print(f"[{label}] starting", flush=True)
            start = time.perf_counter()
            try:
                children = children or start_peers(path, n, args, tmp)
                results[compression] = run_rounds(children, compression, args, label)
            except BenchError as e:
                first, _, tail = str(e).partition("\n")
                results[compression] = (
                    e.rounds if isinstance(e, PartialResult) else Rounds(error=first, log_tail=tail)
                )
                print(f"[{label}] FAILED — {e}", flush=True)
                for child in children:
                    child.close(grace_s=5.0)
                children = []
            print(f"[{label}] done in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        for child in children:
            child.close()
    return results
