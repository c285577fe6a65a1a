"""How long cogen's outer-step averaging takes, against a raw TCP copy of the same bytes.

Every peer is its own OS process (this script with ``--worker peer``) holding its own hivemind DHT,
cogen's ``GroupAverager`` and, for comparison, a bare hivemind ``DecentralizedAverager`` with the
same tensors, matchmaking settings and wire compression. The parent schedules every round at a
common wall-clock start; a round's time is the latest peer's end minus that start. Rounds of
cogen's ``outer_step_now`` (delta, checks, all-reduce + all-gather, verification, outer step) and
of the bare ``DecentralizedAverager.step`` follow each other: one warm-up and ``--rounds`` measured
rounds of the bare averager, then the same of cogen's.

The floor is one process sending the same bytes to another over a plain TCP socket on the same
path (``--worker floor-recv`` / ``floor-send``). Paths: (a) network namespaces, every peer on its
own 1 Gbit/s ``tbf`` link to a bridge (``bench/netns.py``; needs root), and (b) plain loopback.

Run ``python bench/averaging.py --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from netns import NetnsUnavailable, Switch, remove_stale

logger = logging.getLogger("cogen.bench.averaging")

REPLY = "COGEN_BENCH_REPLY "
COMPRESSIONS = ("none", "8bit")
TARGETS = {"floor_ratio_2": 0.8, "floor_ratio_2_8bit": 1.5}  # floor time / cogen time, at least
MB = 1_000_000
SIDE = 1024  # 1024 x 1024 fp32 matrices, as in a transformer block


class BenchError(RuntimeError):
    """A configuration failed to run (one-line explanation)."""


class PartialResult(BenchError):
    """A configuration failed part-way; ``rounds`` holds what was measured before."""

    def __init__(self, rounds: Rounds, cause: BenchError):
        super().__init__(str(cause))
        self.rounds = rounds


# ----------------------------------------------------------------- tensors


def shapes_for(size_bytes: int) -> list[tuple[int, ...]]:
    """fp32 shapes summing to ``size_bytes``: 1024x1024 matrices, then one (rows, 1024) and a vector."""
    rest = size_bytes // 4
    shapes: list[tuple[int, ...]] = []
    while rest >= SIDE * SIDE:
        shapes.append((SIDE, SIDE))
        rest -= SIDE * SIDE
    if rest >= SIDE:
        shapes.append((rest // SIDE, SIDE))
        rest %= SIDE
    if rest:
        shapes.append((rest,))
    return shapes


def random_tensors(shapes: list[tuple[int, ...]], seed: int, scale: float) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in shapes]


# ----------------------------------------------------------------- the child: one peer


class Peer:
    """One group member: a DHT, and per compression cogen's GroupAverager plus a bare hivemind averager."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from hivemind import DHT

        self.index, self.peers = args.index, args.peers[0]
        self.shapes = shapes_for(args.size_mb * MB)
        self.dht = DHT(
            host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=json.loads(args.initial_peers), start=True
        )
        anchor = random_tensors(self.shapes, seed=0, scale=1.0)  # the same anchor on every member
        self.params = [torch.nn.Parameter(a, requires_grad=False) for a in anchor]
        self.group: Any = None
        self.bare: Any = None
        self.find_timeout = 0.0
        self.samples = 0  # what a node passes to outer_step_now: samples processed so far
        self.timeout_s = args.round_timeout

    def setup(self, compression: str) -> None:
        from hivemind import DecentralizedAverager

        from cogen.config import GroupConfig
        from cogen.node.group import GroupAverager
        from cogen.node.wire import wire_compression

        cfg = GroupConfig.model_validate(
            {
                "group_size": self.peers,
                "compression": compression,
                "averaging_timeout_s": self.timeout_s,
                "sync_every": 10**9,  # no exact state sync between the timed rounds
            }
        )
        self.group = GroupAverager(self.dht, f"bench_{compression}", self.params, cfg)
        # the same settings GroupAverager gives its delta averager, without cogen's checks around it
        self.bare = DecentralizedAverager(
            [p.detach().clone() for p in self.params], self.dht, prefix=f"bench_bare_{compression}",
            compression=wire_compression(compression, cfg.compression_threshold), allow_state_sharing=False,
            target_group_size=cfg.group_size, min_group_size=2, min_matchmaking_time=cfg.matchmaking_s,
            request_timeout=cfg.matchmaking_s / 2, allreduce_timeout=cfg.averaging_timeout_s,
            next_chunk_timeout=min(30.0, cfg.averaging_timeout_s), start=True,
        )  # fmt: skip
        self.find_timeout = cfg.matchmaking_s * 2 + 5.0
        self.samples = 0

    def prepare(self, kind: str, seed: int) -> None:
        """Untimed: this round's weights = anchor - a fresh random delta (or the delta, for the bare one)."""
        import torch

        delta = random_tensors(self.shapes, seed=seed * 1000 + self.index, scale=0.01)
        with torch.no_grad():
            if kind == "cogen":
                for p, a, d in zip(self.params, self.group.anchor_state(), delta, strict=True):
                    p.copy_(a - d)
            else:
                with self.bare.get_tensors() as tensors:
                    for t, d in zip(tensors, delta, strict=True):
                        t.copy_(d)

    def go(self, kind: str, start_at: float) -> dict[str, Any]:
        """Wait for the common start, run one round, return when it ended and whether it was whole."""
        time.sleep(max(0.0, start_at - time.time()))
        began = time.time()
        if kind == "cogen":
            self.samples += 1  # equal weights: one sample per member since its last outer step
            report = self.group.outer_step_now(self.samples)
            ok, size, reason = report.ok, report.group_size, report.reason
        else:
            gathered = self.bare.step(weight=1.0, timeout=self.find_timeout, allow_retries=False)
            ok, size, reason = gathered is not None, len(gathered or ()), "" if gathered else "no group"
        return {"end": time.time(), "late": began - start_at, "ok": ok, "group_size": size, "reason": reason}

    def teardown(self) -> None:
        for averager in (self.group, self.bare):
            if averager is not None:
                averager.shutdown()
        self.group = self.bare = None

    def shutdown(self) -> None:
        self.teardown()
        self.dht.shutdown()


def _reply(**data: Any) -> None:
    print(REPLY + json.dumps(data), flush=True)


def run_peer(args: argparse.Namespace) -> None:
    """Serve the parent's commands (one JSON line each on stdin) until ``exit`` or end of input."""
    peer = Peer(args)
    try:
        _reply(ready=True, maddrs=[str(m) for m in peer.dht.get_visible_maddrs()])
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["cmd"]
            if op == "setup":
                peer.setup(cmd["compression"])
                _reply(ready=True)
            elif op == "prepare":
                peer.prepare(cmd["kind"], cmd["seed"])
                _reply(prepared=True)
            elif op == "go":
                _reply(**peer.go(cmd["kind"], cmd["start_at"]))
            elif op == "teardown":
                peer.teardown()
                _reply(ready=True)
            else:
                break
    finally:
        peer.shutdown()


# ----------------------------------------------------------------- the children: raw TCP floor


def floor_receive(host: str, nbytes: int, count: int) -> None:
    """Accept ``count`` connections; read ``nbytes`` from each, then answer one byte."""
    buf = bytearray(4 << 20)
    with socket.create_server((host, 0)) as server:
        server.settimeout(120)
        _reply(port=server.getsockname()[1])
        for _ in range(count):
            conn, _addr = server.accept()
            with conn:
                conn.settimeout(120)
                got = 0
                while got < nbytes:
                    n = conn.recv_into(buf, min(len(buf), nbytes - got))
                    if n == 0:
                        raise BenchError(f"sender closed after {got} of {nbytes} bytes")
                    got += n
                conn.sendall(b"k")


def floor_send(target: str, nbytes: int, count: int) -> None:
    """Send ``nbytes`` ``count`` times, each on a fresh connection; reply with the seconds of each."""
    host, port = target.rsplit(":", 1)
    payload = memoryview(bytearray(nbytes))
    seconds = []
    for _ in range(count):
        with socket.create_connection((host, int(port)), timeout=120) as conn:
            start = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise BenchError("the receiver did not confirm")
            seconds.append(time.perf_counter() - start)
    _reply(seconds=seconds)


# ----------------------------------------------------------------- the parent: children, rounds, report

_LIVE: set[Child] = set()


class Child:
    """A worker process (in its own session) that answers JSON lines; always killed with its group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip
        _LIVE.add(self)
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY) :]))
        self.replies.put(None)

    def send(self, **cmd: Any) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"{self.name} is gone (exit code {self.proc.poll()})\n{self.tail()}") from None

    def reply(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            data = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(
                f"{self.name}: no answer to {what} within {timeout:.0f} s\n{self.tail()}"
            ) from None
        if data is None:
            code = self.proc.wait(10)
            raise BenchError(f"{self.name} exited (code {code}) during {what}\n{self.tail()}")
        return data

    def poll_reply(self, what: str) -> dict[str, Any] | None:
        """The next answer if there is one already (raises if the child exited)."""
        try:
            data = self.replies.get_nowait()
        except queue.Empty:
            return None
        if data is None:
            code = self.proc.wait(10)
            raise BenchError(f"{self.name} exited (code {code}) during {what}\n{self.tail()}")
        return data

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, grace_s: float = 30.0) -> None:
        """Ask it to exit, wait, then SIGKILL its whole process group (its DHT and averager processes)."""
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError):
                self.send(cmd="exit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        _LIVE.discard(self)


@atexit.register
def _kill_children() -> None:
    for child in list(_LIVE):
        child.close(grace_s=1.0)


class Route:
    """Where the peers run: a namespace per peer behind rate-limited links, or loopback."""

    def __init__(self, name: str, switch: Switch | None):
        self.name, self.switch = name, switch

    def host(self, i: int) -> str:
        return self.switch.addresses[i] if self.switch else "127.0.0.1"

    def prefix(self, i: int) -> list[str]:
        return self.switch.exec_prefix(i) if self.switch else []


def _worker_cmd(path: Route, i: int, *flags: str) -> list[str]:
    return [*path.prefix(i), sys.executable, str(Path(__file__).resolve()), *flags]


def measure_floor(path: Route, nbytes: int, rounds: int, tmp: Path) -> list[float]:
    """Seconds to send ``nbytes`` from peer 0 to peer 1 over a plain TCP socket (after one warm-up)."""
    count = ["--bytes", str(nbytes), "--count", str(rounds + 1)]
    recv = Child(
        "floor receiver",
        _worker_cmd(path, 1, "--worker", "floor-recv", "--host", path.host(1), *count),
        tmp / f"{path.name}-floor-recv.log",
    )
    send: Child | None = None
    try:
        port = recv.reply(60, "start")["port"]
        target = f"{path.host(1)}:{port}"
        send = Child(
            "floor sender",
            _worker_cmd(path, 0, "--worker", "floor-send", "--target", target, *count),
            tmp / f"{path.name}-floor-send.log",
        )
        seconds: list[float] = send.reply(60 + 30 * (rounds + 1), "the copies")["seconds"]
        return seconds[1:]
    finally:
        for child in (send, recv):
            if child is not None:
                child.close()


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
                Child(f"peer {i}", _worker_cmd(path, i, *flags), tmp / f"{path.name}-{n}-{i}.log")
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


def _median(values: list[float]) -> float | None:
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
    from cogen.config import GroupConfig

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


# ----------------------------------------------------------------- figures


def _suffix(compression: str) -> str:
    return "" if compression == "none" else f"_{compression}"


def figures(configs: list[dict[str, Any]]) -> dict[str, float]:
    """The ratio keys: floor / cogen per path, peers and compression, and cogen / bare hivemind."""
    out: dict[str, float] = {}
    for c in configs:
        key = "floor_ratio" if c["path"] == "netns" else "loopback_ratio"
        if c["floor_ratio"] is not None:
            out[f"{key}_{c['peers']}{_suffix(c['compression'])}"] = c["floor_ratio"]
    for c in sorted(configs, key=lambda c: c["path"] != "netns"):  # the netns figure if there is one
        if c["cogen_overhead"] is not None:
            out.setdefault(f"cogen_overhead_{c['peers']}{_suffix(c['compression'])}", c["cogen_overhead"])
    return out


COLUMNS = (
    "floor_seconds",
    "bare_seconds",
    "cogen_seconds",
    "floor_ratio",
    "hivemind_floor_ratio",
    "cogen_overhead",
)


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.3f}"


def _align(column: int, cell: str, width: int) -> str:
    return cell.rjust(width) if column > 2 else cell.ljust(width)


def format_table(configs: list[dict[str, Any]]) -> str:
    header = (
        "path",
        "peers",
        "compression",
        "floor s",
        "bare hivemind s",
        "cogen s",
        "ratio",
        "hivemind ratio",
        "cogen/bare",
    )
    rows = [(c["path"], str(c["peers"]), c["compression"], *(_cell(c[k]) for k in COLUMNS)) for c in configs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(_align(i, cell, w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        "ratio = floor s / cogen s (time to copy the same bytes once over a raw TCP socket on the same path,",
        "over the time of cogen's outer_step_now); hivemind ratio = floor s / bare hivemind s;",
        "cogen/bare = cogen s / bare DecentralizedAverager.step s. Seconds: medians of the measured rounds.",
    ]
    lines += [
        f"{c['path']} {c['peers']} peers {c['compression']} FAILED: {c['error']}"
        for c in configs
        if c["error"]
    ]
    return "\n".join(lines)


def format_targets(values: dict[str, float]) -> str:
    lines = []
    for key, target in TARGETS.items():
        if key not in values:
            lines.append(f"{key:<20} not measured   (target >= {target})")
            continue
        verdict = "met" if values[key] >= target else "MISSED"
        lines.append(f"{key:<20} {values[key]:7.3f}        (target >= {target}: {verdict})")
    return "\n".join(lines)


def _config_figures(path: str, n: int, compression: str, floor: float, rounds: Rounds) -> dict[str, Any]:
    """One configuration's figures; the ratios are ``None`` where a kind has no whole round."""
    cogen, bare = _median(rounds.seconds["cogen"]), _median(rounds.seconds["bare"])
    return {
        "path": path,
        "peers": n,
        "compression": compression,
        "floor_seconds": floor,
        "cogen_seconds": cogen,
        "bare_seconds": bare,
        "cogen_rounds": rounds.seconds["cogen"],
        "bare_rounds": rounds.seconds["bare"],
        "failed_rounds": rounds.failed,
        "error": rounds.error,
        "log_tail": rounds.log_tail,
        "floor_ratio": floor / cogen if cogen else None,
        "hivemind_floor_ratio": floor / bare if bare else None,
        "cogen_overhead": cogen / bare if cogen and bare else None,
    }


# ----------------------------------------------------------------- the parent: main flow


def _paths(args: argparse.Namespace) -> tuple[list[Route], dict[str, str]]:
    """The paths to measure; builds the namespaces (removing a crashed run's first) unless skipped."""
    paths: list[Route] = []
    skipped: dict[str, str] = {}
    if args.skip_netns:
        skipped["netns"] = "--skip-netns"
    else:
        try:
            stale = remove_stale()
            if stale:
                print(f"removed network namespaces left by an earlier run: {', '.join(stale)}", flush=True)
            paths.append(Route("netns", Switch(max(max(args.peers), 2), rate=args.rate).create()))
        except NetnsUnavailable as e:
            skipped["netns"] = str(e)
            print(f"skipping the network-namespace path: {e}", flush=True)
    if args.skip_loopback:
        skipped["loopback"] = "--skip-loopback"
    else:
        paths.append(Route("loopback", None))
    return paths, skipped


def measure(
    paths: list[Route], args: argparse.Namespace, tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Floors and all configurations; returns per-config figures and the floors' raw seconds."""
    nbytes = args.size_mb * MB
    configs: list[dict[str, Any]] = []
    floors: dict[str, Any] = {}
    for path in paths:
        print(
            f"[{path.name}] raw TCP floor: {nbytes / MB:.0f} MB, {args.rounds} copies after a warm-up",
            flush=True,
        )
        copies = measure_floor(path, nbytes, args.rounds, tmp)
        floor = statistics.median(copies)
        floors[path.name] = {"seconds": floor, "copies": copies}
        print(
            f"[{path.name}] raw TCP floor: {floor:.3f} s ({8 * nbytes / floor / 1e9:.2f} Gbit/s)", flush=True
        )
        for n in args.peers:
            for compression, rounds in run_configs(path, n, args, tmp).items():
                configs.append(_config_figures(path.name, n, compression, floor, rounds))
                c = configs[-1]
                cogen, bare = _cell(c["cogen_seconds"]), _cell(c["bare_seconds"])
                print(f"[{path.name} {n} peers {compression}] cogen {cogen} s, bare hivemind {bare} s, "
                      f"floor {floor:.3f} s", flush=True)  # fmt: skip
    return configs, floors


def run_benchmark(args: argparse.Namespace) -> int:
    from cogen.checkpoint import write_json_atomic

    nbytes = args.size_mb * MB
    print(
        f"averaging benchmark: {nbytes / MB:.0f} MB of fp32 per peer ({len(shapes_for(nbytes))} tensors), "
        f"peers {args.peers}, {args.rounds} measured round(s) after 1 warm-up, compressions "
        f"{', '.join(args.compressions)}",
        flush=True,
    )
    paths, skipped = _paths(args)
    try:
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            configs, floors = measure(paths, args, args.log_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="cogen-bench-averaging-") as tmp:
                configs, floors = measure(paths, args, Path(tmp))
    finally:
        for path in paths:
            if path.switch is not None:
                path.switch.remove()
    values = figures(configs)
    print()
    print(format_table(configs))
    print()
    print(format_targets(values), flush=True)
    if args.json:
        write_json_atomic(
            args.json,
            {
                **values,
                "targets": {k: {"op": ">=", "value": v} for k, v in TARGETS.items()},
                "meets_targets": {k: values[k] >= v for k, v in TARGETS.items() if k in values},
                "floor_seconds": {k: v["seconds"] for k, v in floors.items()},
                "floors": floors,
                "bytes_per_peer": nbytes,
                "skipped": skipped,
                "settings": _settings(args),
                "configs": configs,
            },
        )
        print(f"wrote {args.json}", flush=True)
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import hivemind
    import torch

    from cogen.config import GroupConfig

    nbytes = args.size_mb * MB
    return {
        "size_mb": args.size_mb,
        "bytes_per_peer": nbytes,
        "shapes": shapes_for(nbytes),
        "peers": args.peers,
        "rounds": args.rounds,
        "warmup_rounds": 1,
        "compressions": args.compressions,
        "rate": args.rate,
        "tbf": "burst 1mb latency 50ms, on both ends of every peer's veth",
        "round_timeout_s": args.round_timeout,
        "group_config": GroupConfig(compression="none").model_dump(exclude={"compression", "group_size"}),
        "cogen_overhead_path": "netns if measured, else loopback",
        "hivemind": hivemind.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="time of cogen's outer-step averaging (GroupAverager.outer_step_now) and of bare "
        "hivemind averaging among 2 and 4 peer processes, against a raw TCP copy of the same bytes, across "
        "1 Gbit/s network namespaces and on loopback",
    )
    parser.add_argument(
        "--size-mb", type=int, default=100, help="fp32 pseudo-gradient per peer, in MB (10^6 B)"
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes to measure")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds of each kind (after 1 warm-up)"
    )
    parser.add_argument(
        "--compressions",
        nargs="+",
        choices=COMPRESSIONS,
        default=list(COMPRESSIONS),
        help="wire formats to measure (none: fp32; 8bit: cogen's default)",
    )
    parser.add_argument("--rate", default="1gbit", help="tbf rate of every peer's link in the namespaces")
    parser.add_argument(
        "--round-timeout", type=float, default=120.0, help="averaging timeout of one round, s"
    )
    parser.add_argument("--skip-netns", action="store_true", help="do not measure across network namespaces")
    parser.add_argument("--skip-loopback", action="store_true", help="do not measure on plain loopback")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep every worker's log here (default: a temp dir, removed)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all figures here as JSON (atomically)")
    parser.add_argument("--worker", choices=("peer", "floor-recv", "floor-send"), help=argparse.SUPPRESS)
    for hidden in ("--host", "--target", "--initial-peers"):
        parser.add_argument(
            hidden, default="[]" if hidden == "--initial-peers" else None, help=argparse.SUPPRESS
        )
    for hidden in ("--index", "--bytes", "--count"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.rounds < 1 or args.round_timeout <= 0:
        parser.error("--size-mb and --rounds must be at least 1, --round-timeout positive")
    if any(not 2 <= n <= 64 for n in args.peers):
        parser.error("--peers: each group size must be between 2 and 64")
    args.peers = sorted(set(args.peers))
    return args


def run_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("COGEN_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    if args.worker == "peer":
        run_peer(args)
    elif args.worker == "floor-recv":
        floor_receive(args.host, args.bytes, args.count)
    else:
        floor_send(args.target, args.bytes, args.count)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: children and namespaces go
    from cogen.exit_codes import ExitCode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_benchmark(args)
    except BenchError as e:
        logger.error("averaging: %s", e)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        logger.error("averaging: interrupted")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
