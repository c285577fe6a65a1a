"""Test helpers for fetching bases: a misbehaving donor (a real HTTP server), a coordinator's announcement."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hivemind.utils import get_dht_time

from cogen.coordinator.merging import Identity
from cogen.core.config import NetworkConfig
from cogen.core.swarm import SwarmClient
from cogen.protocols import CheckpointSource, SwarmInfo
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE

PEER = "12D3KooWSb9uUfn3yQrD2xTJmUFr4PbYBb7oYbP2pCSs3rGqCwTq"
WEIGHTS = "model.safetensors"


def announce_swarm(client: SwarmClient, identity: Identity, ttl_s: float | None = None) -> None:
    """Publish the SwarmInfo record a coordinator with ``identity`` publishes (its key, signing the
    record's owner)."""
    info = SwarmInfo(
        swarm=client.cfg.swarm, coordinator_peer_id=client.peer_id, manifest_key=identity.public_key,
        owner_signature=identity.sign_owner(client.cfg.swarm, client.owner), software_version="test",
        started_at=time.time(), updated_at=time.time(),
    )  # fmt: skip
    client.publish(info, ttl_s=ttl_s).result()


class Donor:
    """A real HTTP server over ``root`` that serves ``WEIGHTS`` ``how``: ``serve`` (properly), ``die``
    (half of it, then the server closes the connection and stops listening), ``trickle`` (2 kB/s),
    ``endless`` (no length, zeros until the client hangs up) or ``liar`` (a longer Content-Length, then
    nothing); ``redirect`` answers every request with a 302 to the same name under ``redirect_to``. The
    first ``fail_first`` requests get 503."""

    def __init__(self, root: Path, how: str = "serve", fail_first: int = 0):
        self.root, self.how, self.fail_first = root, how, fail_first
        self.redirect_to = ""
        self.requests: list[tuple[float, str]] = []
        self.sent = 0
        self.release = threading.Event()
        self.done = threading.Event()  # a misbehaving response ended
        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Handler, self, directory=str(root))
        )
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def source(self, generation: int = 1) -> CheckpointSource:
        sha = sha256_file(self.root / MANIFEST_FILE)
        return CheckpointSource(
            peer_id=PEER, generation=generation, manifest_sha256=sha, url=self.url, time=get_dht_time()
        )

    def asked(self, name: str) -> list[float]:
        return [t for t, n in self.requests if n == name]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, donor: Donor, *args: Any, **kwargs: Any):
        self.donor = donor
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        donor, name = self.donor, self.path.rsplit("/", 1)[-1]
        donor.requests.append((time.monotonic(), name))
        if donor.fail_first > 0:
            donor.fail_first -= 1
            self.send_error(503)
            return
        if donor.how == "redirect":
            self.send_response(302)
            self.send_header("Location", donor.redirect_to + name)
            self.end_headers()
            return
        if name != WEIGHTS or donor.how == "serve":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                super().do_GET()
            return
        data = (donor.root / WEIGHTS).read_bytes()
        self.send_response(200)
        if donor.how != "endless":
            self.send_header("Content-Length", str(len(data) + (donor.how == "liar")))
        self.end_headers()
        try:
            getattr(self, f"_{donor.how}")(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up
        finally:
            donor.done.set()

    def _send(self, block: bytes) -> None:
        self.wfile.write(block)
        self.wfile.flush()
        self.donor.sent += len(block)

    def _die(self, data: bytes) -> None:
        self._send(data[: len(data) // 2])
        self.close_connection = True

        def stop_listening() -> None:
            self.donor.server.shutdown()
            self.donor.server.server_close()

        threading.Thread(target=stop_listening, daemon=True).start()

    def _trickle(self, data: bytes) -> None:
        for i in range(0, len(data), 100):
            if self.donor.release.wait(0.05):
                return
            self._send(data[i : i + 100])

    def _endless(self, data: bytes) -> None:
        zeros = bytes(1 << 20)
        for _ in range(1024):  # 1 GiB, unless the client stops reading
            self._send(zeros)

    def _liar(self, data: bytes) -> None:
        self.donor.release.wait(60)


@contextlib.contextmanager
def swarm_of(name: str) -> Iterator[tuple[SwarmClient, Callable[[], SwarmClient]]]:
    """A real DHT named after a test: the follower's own client, and a way to start more peers that
    join it; every client is shut down at the end."""
    name = name.replace("_", "-")[:40].strip("-")
    host = SwarmClient(NetworkConfig(swarm=name, host="127.0.0.1"))
    clients = [host]

    def join() -> SwarmClient:
        peers = tuple(host.visible_maddrs())
        clients.append(SwarmClient(NetworkConfig(swarm=name, host="127.0.0.1", initial_peers=peers)))
        return clients[-1]

    try:
        yield host, join
    finally:
        for client in clients:
            client.shutdown()
