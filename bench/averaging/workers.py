"""The averaging benchmark's worker processes: one group member, and the two ends of the raw TCP copy.

``python -m bench.averaging`` starts each of them as itself with ``--worker peer|floor-recv|floor-send``
(inside a peer's network namespace where there is one); a worker answers its parent with one
``REPLY``-prefixed JSON line per command on stdout, and logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from ..harness import BenchError

REPLY = "COGEN_BENCH_REPLY "
MB = 1_000_000
SIDE = 1024  # 1024 x 1024 fp32 matrices, as in a transformer block


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

        from cogen.core.config import GroupConfig
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
