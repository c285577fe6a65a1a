"""The coordinator scrapes nodes' own /metrics only at each node's own address, concurrently, bounded.

A real DHT: the coordinator's peer and one peer per node, joined to it (so the coordinator's libp2p
daemon is connected to each at 127.0.0.1); real HTTP servers on 127.0.0.1 and, for "another host",
127.0.0.2.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cogen.coordinator.api import create_app
from cogen.coordinator.metrics import make_registry
from cogen.coordinator.scraping import MAX_BODY_BYTES, NodeScraper, observed_hosts, refusal
from cogen.coordinator.view import SwarmMonitor
from cogen.core.config import NetworkConfig
from cogen.core.procs import wait_for
from cogen.core.swarm import SwarmClient, owner_fingerprint
from cogen.node.metrics import NodeMetrics
from cogen.protocols import Hardware, NodeInfo, software_version

HUGE = 100 << 20  # the body a hostile target would send


@dataclass
class Target:
    """A real HTTP server on ``host`` that answers ``how``: ``slow`` (headers, then a byte every 0.1 s
    until released), ``redirect`` (302 to ``location``), ``huge`` (100 MB, no Content-Length) or
    ``metrics`` (a valid body)."""

    host: str
    how: str
    location: str = ""
    requests: int = 0
    sent: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    server: Any = None

    def __post_init__(self) -> None:
        target = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                target.requests += 1
                if target.how == "redirect":
                    self.send_response(302)
                    self.send_header("Location", target.location)
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the scraper hung up
                    target.respond(self)

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}/metrics"

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        if self.how == "slow":
            while not self.release.wait(0.1):
                self._send(handler, b"#")
        elif self.how == "huge":
            block = b"#" * (1 << 20)
            for _ in range(HUGE // len(block)):
                self._send(handler, block)
        else:
            self._send(handler, b"cogen_node_steps_total 1.0\n")

    def _send(self, handler: BaseHTTPRequestHandler, block: bytes) -> None:
        handler.wfile.write(block)
        handler.wfile.flush()
        self.sent += len(block)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Swarm:
    """The coordinator's peer with a monitor, and node peers that joined it."""

    def __init__(self, name: str):
        self.name = name
        self.coordinator = SwarmClient(NetworkConfig(swarm=name, host="127.0.0.1"))
        self.monitor = SwarmMonitor(self.coordinator)
        self.nodes: list[SwarmClient] = []

    def node(self, metrics_url: str | None, time_ahead_s: float = 0.0) -> str:
        """A node peer that announces ``metrics_url`` (its clock ``time_ahead_s`` ahead); returns its
        fingerprint."""
        peers = tuple(self.coordinator.visible_maddrs())
        client = SwarmClient(NetworkConfig(swarm=self.name, host="127.0.0.1", initial_peers=peers))
        self.nodes.append(client)
        hw = Hardware(device="cpu", device_name="cpu", memory_bytes=1, cpu_count=1,
                      supports_bf16=False, supports_fp16=False, supports_int8=True)  # fmt: skip
        client.publish(NodeInfo(
            peer_id=client.peer_id, expert="code", hardware=hw, software_version=software_version(),
            model="tiny", precision="int8", shard=0, num_shards=1, state="training", started_at=time.time(),
            updated_at=time.time() + time_ahead_s, metrics_url=metrics_url,
        )).result()  # fmt: skip
        return owner_fingerprint(client.owner)

    def ready(self) -> None:
        """Wait until the monitor sees every node's URL and the coordinator is connected to every node."""
        wait_for(lambda: self.monitor.poll() or len(self.monitor.metrics_urls()) == len(self.nodes), 60,
                 "every node's metrics URL in the view")  # fmt: skip
        ids = {n.peer_id for n in self.nodes}
        wait_for(lambda: ids <= set(observed_hosts(self.coordinator.connected_peers(limit=4096))), 60,
                 "the coordinator connected to every node")  # fmt: skip

    def shutdown(self) -> None:
        for client in [*self.nodes, self.coordinator]:
            client.shutdown()


@pytest.fixture
def swarm(request: pytest.FixtureRequest) -> Iterator[Swarm]:
    swarm = Swarm(request.node.name.replace("_", "-")[:40].strip("-"))
    yield swarm
    swarm.shutdown()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_node_metrics_are_scraped_at_the_nodes_address_and_relabelled(swarm: Swarm) -> None:
    with NodeMetrics(expert="code") as node:
        url = node.start("127.0.0.1", 0)
        node.set_state("training")
        node.observe_step(loss=2.0, samples=4, tokens=128, seconds=0.5)
        node.observe_step(loss=math.nan, samples=4, tokens=128, seconds=0.5)
        peer = swarm.node(url)
        swarm.ready()
        scraper = NodeScraper(swarm.monitor)
        try:
            wait(scraper.scrape_once().values(), timeout=30)
        finally:
            scraper.stop()
        got = samples(
            TestClient(create_app(swarm.monitor, make_registry(swarm.monitor, scraper))).get("/metrics").text
        )
    labels = (("expert", "code"), ("peer", peer))
    assert got[("cogen_node_steps_total", labels)] == 2
    assert got[("cogen_node_samples_total", labels)] == 8
    assert got[("cogen_node_nan_steps_total", labels)] == 1
    state = tuple(sorted((*labels, ("cogen_node_state", "training"))))
    assert got[("cogen_node_state", state)] == 1


def test_hostile_metrics_urls_are_refused_or_cut_off_and_a_slow_one_stalls_no_other(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = Target("127.0.0.2", "metrics")  # another host than the peer's: never to be asked
    targets = {
        "fast": Target("127.0.0.1", "metrics"),
        "slow": Target("127.0.0.1", "slow"),
        "redirect": Target("127.0.0.1", "redirect", location=elsewhere.url),
        "huge": Target("127.0.0.1", "huge"),
    }
    try:
        fps = {name: swarm.node(t.url) for name, t in targets.items()}
        fps["elsewhere"] = swarm.node(elsewhere.url)
        swarm.ready()
        scraper = NodeScraper(swarm.monitor, timeout_s=10.0, deadline_s=120.0)  # slow: held by its release
        try:
            with caplog.at_level(logging.INFO, logger="cogen.coordinator.scraping"):
                started = scraper.scrape_once()
                assert fps["elsewhere"] not in started  # refused before any request: another host
                wait_for(lambda: fps["fast"] in scraper.families, 60, "the fast node scraped")
                wait([started[fps["redirect"]], started[fps["huge"]]], timeout=60)  # refused, cut off
                assert not started[fps["slow"]].done() and targets["slow"].requests == 1  # still hanging
                assert scraper.counts["ok"] == 1 and scraper.counts["failed"] == 2
                again = scraper.scrape_once()  # the slow scrape still runs: it is not asked again
                assert set(again) == {fps["fast"], fps["redirect"], fps["huge"]}
                wait(again.values(), timeout=60)
                assert targets["fast"].requests == 2 and targets["slow"].requests == 1
                line = scraper.summarise(force=True)
                families = set(scraper.families)
        finally:
            targets["slow"].release.set()
            scraper.stop()
    finally:
        for t in [*targets.values(), elsewhere]:
            t.stop()
    assert elsewhere.requests == 0  # neither asked directly nor through the redirect
    assert targets["huge"].sent < HUGE // 4  # cut off after MAX_BODY_BYTES (plus what sockets buffer)
    assert families == {fps["fast"]}
    assert line is not None and "2 ok, 4 failed, 2 refused, 1 busy" in line
    assert "127.0.0.2 is not the peer's address (127.0.0.1)" in line
    logged = [r for r in caplog.records if r.name == "cogen.coordinator.scraping"]
    assert [r.getMessage() for r in logged] == [line]  # one line for the interval, not one per failure
    assert MAX_BODY_BYTES < HUGE


def test_a_record_from_the_future_is_left_out_of_the_view(swarm: Swarm) -> None:
    """A node whose record claims a time an hour ahead would stay "online" for ever: it is not shown."""
    honest = swarm.node("http://127.0.0.1:9/metrics")
    ahead = swarm.node("http://127.0.0.1:9/metrics", time_ahead_s=3600)
    wait_for(lambda: swarm.monitor.poll() or len(swarm.coordinator.fetch(NodeInfo)) == 2, 60, "both records")
    swarm.monitor.poll()
    assert [p.id for p in swarm.monitor.view().snapshot.peers] == [honest]
    assert set(swarm.monitor.metrics_urls()) == {honest} and ahead not in swarm.monitor.metrics_urls()


def test_the_address_rule() -> None:
    maddrs = [
        "/ip4/10.0.0.5/tcp/31337/p2p/QmPeerA",
        "/ip6/::1/tcp/4001/p2p/QmPeerB",
        "/ip4/10.0.0.9/tcp/1/p2p/QmRelay/p2p-circuit/p2p/QmPeerC",  # relayed: the relay's address
        "/dns4/example.org/tcp/1/p2p/QmPeerD",
    ]
    hosts = observed_hosts(maddrs)
    assert hosts == {"QmPeerA": {"10.0.0.5"}, "QmPeerB": {"::1"}}
    assert refusal("http://10.0.0.5:9100/metrics", hosts["QmPeerA"]) is None
    assert refusal("http://[0:0::1]:9100/metrics", hosts["QmPeerB"]) is None  # the same address, spelled out
    assert "not the peer's address" in (refusal("http://10.0.0.6:9100/metrics", hosts["QmPeerA"]) or "")
    assert "not an IP address" in (refusal("http://localhost:9100/metrics", hosts["QmPeerA"]) or "")
    assert "not an http URL" in (refusal("https://10.0.0.5/metrics", hosts["QmPeerA"]) or "")
    assert "not connected" in (refusal("http://10.0.0.9:9100/metrics", set()) or "")
    assert "malformed" in (refusal("http://10.0.0.5:99999/metrics", hosts["QmPeerA"]) or "")
