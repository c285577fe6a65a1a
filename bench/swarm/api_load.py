"""Load on the coordinator's API with the DHT full of simulated peers.

Starts ``--dht-peers`` real hivemind DHT processes that store signed ``NodeInfo`` and
``TrainingProgress`` records for ``--peers`` simulated nodes (each its own RSA key: the storing DHTs
sign with :class:`OwnerSigner`, which composes hivemind's ``RSASignatureValidator`` per owner key),
starts a real ``cogen-coordinator`` process joined to them, waits until ``/api/swarm`` shows every
peer, then sends ``--requests`` requests to each of ``/api/swarm`` and ``/api/peers`` from
``--concurrency`` clients (keep-alive, 127.0.0.1) and reports latency percentiles.

    .venv/bin/python -m bench.swarm.api_load --json /tmp/api_load.json [--peers 1000]

JSON keys: ``peers``, ``p95_ms`` (all requests), ``p50_ms``, ``p99_ms``, ``requests``, ``concurrency``,
``endpoints`` (per-endpoint percentiles and body size). Target: ``p95_ms`` < 100 at 1000 peers.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import base58
import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from cogen.core.procs import ChildFailed, read_json, spawn, stop, tail, wait_for
from cogen.protocols import (
    Hardware,
    NodeInfo,
    TrainingProgress,
    software_version,
    swarm_key,
)
from cogen.protocols.validation import CogenRecordValidator

from ..harness import BenchError, new_parser, parse, run_main, write_report

SWARM = "apiload"
EXPERTS = ("medical", "legal", "code", "literature")
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX, re.DOTALL)


class OwnerSigner(RecordValidatorBase):
    """Signs each record with the key of the owner its subkey names (one DHT storing for many owners)."""

    def __init__(self, keys: list[RSAPrivateKey]):
        self.signers = {RSASignatureValidator(k).local_public_key: RSASignatureValidator(k) for k in keys}
        self.checker = next(iter(self.signers.values()))

    def validate(self, record: DHTRecord) -> bool:
        return self.checker.validate(record)  # checks the owner's signature, whoever that is

    def sign_value(self, record: DHTRecord) -> bytes:
        found = _OWNER_RE.search(record.subkey)  # the subkey arrives msgpack-serialized
        signer = self.signers.get(found.group(0)) if found else None
        return signer.sign_value(record) if signer is not None else record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.checker.strip_value(record)

    @property
    def priority(self) -> int:
        return 10  # like RSASignatureValidator: before the validators that decode the value


def fake_peer_id(i: int) -> str:
    return "12D3KooW" + base58.b58encode(hashlib.sha256(b"peer%d" % i).digest()).decode()[:44]


def records(i: int) -> tuple[NodeInfo, TrainingProgress]:
    now, expert = time.time(), EXPERTS[i % len(EXPERTS)]
    hw = Hardware(
        device="cuda:0",
        device_name="Simulated GPU",
        memory_bytes=24 * 2**30,
        cpu_count=8,
        supports_bf16=True,
        supports_fp16=True,
        supports_int8=True,
    )
    info = NodeInfo(
        peer_id=fake_peer_id(i),
        expert=expert,
        hardware=hw,
        software_version=software_version(),
        model="bench",
        precision="int8",
        shard=i % 16,
        num_shards=16,
        state="training",
        started_at=now,
        updated_at=now,
    )
    prog = TrainingProgress(
        peer_id=fake_peer_id(i),
        expert=expert,
        step=100 + i,
        samples=400 + i,
        tokens=51200 + i,
        loss=2.0 + i / 1e4,
        samples_per_second=10.0,
        peak_memory_bytes=2**30,
        time=get_dht_time(),
    )
    return info, prog


def fill_dht(n_peers: int, n_dhts: int) -> list[hivemind.DHT]:
    t0 = time.monotonic()
    keys = [RSAPrivateKey() for _ in range(n_peers)]
    print(f"generated {n_peers} RSA keys in {time.monotonic() - t0:.1f} s", flush=True)
    dhts: list[hivemind.DHT] = []
    for d in range(n_dhts):
        mine = keys[d::n_dhts]
        initial = [str(a) for a in dhts[0].get_visible_maddrs()] if dhts else []
        dhts.append(
            hivemind.DHT(
                initial_peers=initial,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                start=True,
                record_validators=[OwnerSigner(mine), CogenRecordValidator(SWARM)],
            )
        )
    t0, expiry, futures = time.monotonic(), get_dht_time() + 3600, []
    for i, key in enumerate(keys):
        owner = RSASignatureValidator(key).local_public_key
        info, prog = records(i)
        dht = dhts[i % n_dhts]
        for rec in (info, prog):
            futures.append(
                dht.store(swarm_key(SWARM, rec.KIND), rec.to_wire(), expiry, subkey=owner, return_future=True)
            )
    stored = sum(bool(f.result()) for f in futures)
    print(f"stored {stored}/{len(futures)} signed records in {time.monotonic() - t0:.1f} s", flush=True)
    return dhts


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], 2),
        "p95_ms": round(q[94], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(values), 2),
    }


def load(host: str, port: int, path: str, requests: int, concurrency: int) -> tuple[list[float], int]:
    per_worker = [requests // concurrency + (w < requests % concurrency) for w in range(concurrency)]

    def worker(count: int) -> tuple[list[float], int]:
        conn, times, size = http.client.HTTPConnection(host, port, timeout=30), [], 0
        for _ in range(count):
            t = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            times.append((time.perf_counter() - t) * 1000)
            assert response.status == 200, (path, response.status)
            size = len(body)
        conn.close()
        return times, size

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, per_worker))
    return [t for times, _ in results for t in times], results[0][1]


def run(args: argparse.Namespace) -> int:
    """Fill the DHT, start the coordinator, load its API and report the latencies."""
    work = Path(tempfile.mkdtemp(prefix="cogen-api-load-"))
    dhts = fill_dht(args.peers, args.dht_peers)
    coordinator = None
    try:
        ready = work / "ready.json"
        coordinator = spawn(
            "cogen.coordinator.cli",
            [
                "--swarm",
                SWARM,
                "--host",
                "127.0.0.1",
                "--api-port",
                "0",
                "--ready-file",
                str(ready),
                "--initial-peers",
                *[str(a) for a in dhts[0].get_visible_maddrs()],
                "--poll-interval-s",
                "2",
                "--history-path",
                str(work / "history.sqlite3"),
            ],
            work / "coordinator.log",
        )
        api = wait_for(lambda: read_json(ready), 60, "coordinator ready", alive=[coordinator])["api_url"]
        host, port = api.removeprefix("http://").rsplit(":", 1)

        def seen() -> int | None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/api/swarm")
            online = json.loads(conn.getresponse().read())["peers_online"]
            conn.close()
            return online if online >= args.peers else None

        t0 = time.monotonic()
        wait_for(seen, 180, f"all {args.peers} peers in /api/swarm", 1.0, [coordinator])
        print(f"coordinator shows all {args.peers} peers after {time.monotonic() - t0:.1f} s", flush=True)
        everything: list[float] = []
        endpoints: dict[str, Any] = {}
        for path in ("/api/swarm", "/api/peers"):
            load(host, int(port), path, 20, args.concurrency)  # warm-up
            times, size = load(host, int(port), path, args.requests, args.concurrency)
            everything += times
            endpoints[path] = {**percentiles(times), "requests": len(times), "body_bytes": size}
    finally:
        if coordinator is not None:
            code = stop(coordinator)
            if code != 0:
                print(tail(work / "coordinator.log"), file=sys.stderr)
        for dht in dhts:
            dht.shutdown()
    overall = percentiles(everything)
    print(f"\nAPI latency with {args.peers} peers, {args.concurrency} concurrent clients, loopback")
    print(
        f"{'endpoint':<14}{'requests':>9}{'body KiB':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    for path, e in endpoints.items():
        print(
            f"{path:<14}{e['requests']:>9}{e['body_bytes'] / 1024:>10.0f}{e['p50_ms']:>9.1f}"
            f"{e['p95_ms']:>9.1f}{e['p99_ms']:>9.1f}{e['max_ms']:>9.1f}"
        )
    print(
        f"{'all':<14}{len(everything):>9}{'':>10}{overall['p50_ms']:>9.1f}{overall['p95_ms']:>9.1f}"
        f"{overall['p99_ms']:>9.1f}{overall['max_ms']:>9.1f}   (target p95 < 100 ms at 1000 peers)"
    )
    result = {
        "peers": args.peers,
        **overall,
        "requests": len(everything),
        "concurrency": args.concurrency,
        "dht_peers": args.dht_peers,
        "endpoints": endpoints,
    }
    write_report(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(__doc__)
    parser.add_argument(
        "--peers", type=int, default=1000, help="simulated nodes with signed records in the DHT"
    )
    parser.add_argument("--dht-peers", type=int, default=3, help="real DHT processes storing the records")
    parser.add_argument("--requests", type=int, default=400, help="per endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="keep-alive clients at once")
    args = parse(parser, argv)
    return run_main("api_load", lambda: run(args), plain_logging=True, errors=(BenchError, ChildFailed))


if __name__ == "__main__":
    sys.exit(main())
