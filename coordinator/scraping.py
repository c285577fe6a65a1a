"""Scraping the nodes' own ``/metrics``: only at the node's own address, concurrently, bounded.

Nodes started with ``--metrics-port`` announce a ``metrics_url`` in their NodeInfo record;
:class:`NodeScraper` fetches those in a thread pool and keeps their ``cogen_node_*`` families for
:class:`cogen.coordinator.metrics.SwarmCollector` to re-expose. A NodeInfo record is signed, but what it
says is its owner's word, so a hostile peer could name any URL and have the coordinator probe its
operator's network every few seconds. The rule (:func:`refusal`):

- the URL's host must be an IP address at which this coordinator's libp2p daemon is connected to the
  peer id the record names. A libp2p connection is authenticated (the handshake proves the peer holds
  that id's key), so that address is the peer's own, observed, not announced. Relayed connections
  (``/p2p-circuit``) do not count: their address is the relay's. A node the coordinator is not connected
  to is not scraped until it is (nodes dial the coordinator, their initial peer, when they join);
- a peer id claimed by several record owners is scraped for none (:meth:`SwarmMonitor.metrics_urls`),
  and the coordinator's own id is never among its connections;
- ``http://`` only, no redirects, a socket timeout, a deadline for the whole body, at most
  ``MAX_BODY_BYTES`` (:mod:`cogen.core.http_client`).

Scrapes run ``MAX_SCRAPES`` at a time; a target whose last scrape is still running is not asked again,
so one slow node neither stalls the others nor piles up threads. Failures and refusals are counted and
logged in one line per ``SUMMARY_EVERY_S``, with one example, never one line each.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cogen.coordinator.view import SwarmMonitor
from cogen.core.addresses import maddr_host
from cogen.core.http_client import fetch_bounded
from cogen.core.periodic import PeriodicService

logger = logging.getLogger(__name__)

NODE_PREFIX = "cogen_node_"
MAX_BODY_BYTES = 256 * 1024  #: a node's /metrics body at most (a longer one is cut off and refused)
SCRAPE_TIMEOUT_S = 1.0  #: socket timeout of one scrape (connect, and each read)
SCRAPE_DEADLINE_S = 3.0  #: the whole body of one scrape
MAX_SCRAPES = 8  #: scrapes running at once
SUMMARY_EVERY_S = 60.0  #: seconds between the scraper's summary lines (when anything failed)
_MAX_CONNECTIONS = 4096  # connected peers listed per interval at most


def scrape(
    url: str, timeout_s: float = SCRAPE_TIMEOUT_S, deadline_s: float = SCRAPE_DEADLINE_S
) -> list[Metric]:
    """The ``cogen_node_*`` metric families at ``url`` (plain http, no redirects, bounded)."""
    body = fetch_bounded(url, timeout_s, MAX_BODY_BYTES, deadline_s)
    return [f for f in text_string_to_metric_families(body.decode()) if f.name.startswith(NODE_PREFIX)]


def observed_hosts(connected: list[str]) -> dict[str, set[str]]:
    """Peer id -> the IP addresses this peer's libp2p daemon is connected to it at (from multiaddrs with
    ``/p2p/<id>``, as :meth:`cogen.core.swarm.SwarmClient.connected_peers` lists them; relays left out)."""
    hosts: dict[str, set[str]] = {}
    for maddr in connected:
        if "/p2p-circuit" in maddr or "/p2p/" not in maddr:
            continue
        host = maddr_host(maddr)
        if host is not None:
            hosts.setdefault(maddr.rsplit("/p2p/", 1)[1], set()).add(str(ipaddress.ip_address(host)))
    return hosts


def refusal(url: str, hosts: set[str]) -> str | None:
    """Why ``url`` is not scraped for a peer observed at ``hosts`` (None: it may be)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return "a malformed URL"
    if parts.scheme != "http":
        return "not an http URL"
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return f"its host {host!r} is not an IP address"
    if not hosts:
        return "this coordinator is not connected to that peer (its address is unknown)"
    if address not in hosts:
        return f"{address} is not the peer's address ({', '.join(sorted(hosts))})"
    return None


class NodeScraper(PeriodicService):
    """Scrapes each online node's ``/metrics`` every ``interval_s``; ``start`` / ``stop`` / ``is_running``."""

    def __init__(
        self,
        monitor: SwarmMonitor,
        interval_s: float = 5.0,
        timeout_s: float = SCRAPE_TIMEOUT_S,
        deadline_s: float = SCRAPE_DEADLINE_S,
    ):
        super().__init__("node-scraper", interval_s, run_first=False)
        self.monitor = monitor
        self.timeout_s, self.deadline_s = timeout_s, deadline_s
        self._families: dict[str, list[Metric]] = {}  # fingerprint -> its cogen_node_* families
        self._running: dict[str, Future[None]] = {}
        self._pool = ThreadPoolExecutor(MAX_SCRAPES, thread_name_prefix="node-scrape")
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  #: scrapes by outcome since the last summary line
        self._examples: dict[str, str] = {}
        self._summarised = time.monotonic()

    @property
    def families(self) -> dict[str, list[Metric]]:
        """Fingerprint -> the ``cogen_node_*`` families of its last good scrape (online nodes only)."""
        with self._lock:
            return dict(self._families)

    def tick(self) -> None:
        self.scrape_once()
        self.summarise()

    def scrape_once(self) -> dict[str, Future[None]]:
        """Start a scrape of every node that may be scraped and is not being scraped; returns them by
        fingerprint."""
        targets = self.monitor.metrics_urls()
        hosts = observed_hosts(self.monitor.client.connected_peers(limit=_MAX_CONNECTIONS))
        started: dict[str, Future[None]] = {}
        with self._lock:
            for fp in set(self._families) - set(targets):
                del self._families[fp]
            for fp, (peer_id, url) in targets.items():
                if fp in self._running:
                    self._count("busy", f"{url}: the last scrape is still running")
                    continue
                why = refusal(url, hosts.get(peer_id, set()))
                if why is not None:
                    self._families.pop(fp, None)
                    self._count("refused", f"{url}: {why}")
                    continue
                started[fp] = self._running[fp] = self._pool.submit(self._scrape, fp, url)
        return started

    def _scrape(self, fp: str, url: str) -> None:
        try:
            found: list[Metric] | None = scrape(url, self.timeout_s, self.deadline_s)
            outcome, detail = "ok", ""
        except Exception as e:  # an unreachable or misbehaving node: counted, never raised
            found, outcome, detail = (
                None,
                "failed",
                f"{url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            )
        with self._lock:
            del self._running[fp]
            if found is None:
                self._families.pop(fp, None)
            else:
                self._families[fp] = found
            self._count(outcome, detail)

    def _count(self, outcome: str, example: str) -> None:
        self.counts[outcome] += 1
        if example:
            self._examples[outcome] = example

    def summarise(self, force: bool = False) -> str | None:
        """Log (and return) one line per ``SUMMARY_EVERY_S`` when any scrape failed, was refused or is
        stuck, and start counting anew; ``force``: whatever the time."""
        now = time.monotonic()
        if not force and now - self._summarised < SUMMARY_EVERY_S:
            return None
        with self._lock:
            counts, examples = dict(self.counts), dict(self._examples)
            self.counts.clear()
            self._examples.clear()
        self._summarised = now
        if not set(counts) - {"ok"}:
            return None
        shown = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("ok", "failed", "refused", "busy"))
        example = "; ".join(f"{k}: {examples[k]}" for k in ("refused", "failed", "busy") if k in examples)
        line = f"node metrics scrapes: {shown} (e.g. {example})"
        logger.info("%s", line)
        return line

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)  # a scrape in flight ends by its deadline
