"""Prometheus metrics of the swarm at ``/metrics`` (``prometheus_client``, one registry per app).

:class:`SwarmCollector` reads the monitor's latest :class:`~cogen.coordinator.view.SwarmView` at
scrape time (no state of its own), so several apps in one process never clash. Nodes started with
``--metrics-port`` serve their own ``/metrics``; :class:`cogen.coordinator.scraping.NodeScraper` fetches
those (only ``cogen_node_*`` families, only at the node's own address, bounded) and the collector
re-exposes them with ``peer`` and ``expert`` labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cogen.coordinator.scraping import NodeScraper
from cogen.coordinator.view import SwarmMonitor


class SwarmCollector(Collector):
    """Swarm-level gauges and counters, computed from the monitor's view at each scrape."""

    def __init__(self, monitor: SwarmMonitor, scraper: NodeScraper | None = None):
        self.monitor = monitor
        self.scraper = scraper

    def collect(self) -> Iterator[Metric]:
        view = self.monitor.view()
        snap = view.snapshot
        online = GaugeMetricFamily("cogen_peers_online", "Online peers, per expert", labels=["expert"])
        sps = GaugeMetricFamily(
            "cogen_samples_per_second", "Training samples/s, per expert", labels=["expert"]
        )
        loss = GaugeMetricFamily(
            "cogen_loss", "Mean training loss of online peers, per expert", labels=["expert"]
        )
        tokens = CounterMetricFamily("cogen_tokens", "Tokens trained on, per expert", labels=["expert"])
        rounds = CounterMetricFamily(
            "cogen_averaging_rounds",
            "Averaging rounds seen, per expert and result",
            labels=["expert", "result"],
        )
        sent = CounterMetricFamily("cogen_averaging_bytes_sent", "Bytes sent in averaging", labels=["expert"])
        outer = GaugeMetricFamily("cogen_outer_step", "Latest outer step, per expert", labels=["expert"])
        for g in view.groups:
            online.add_metric([g.expert], g.members)
            sps.add_metric([g.expert], g.samples_per_second)
            if g.mean_loss is not None:
                loss.add_metric([g.expert], g.mean_loss)
            tokens.add_metric([g.expert], g.tokens)
            rounds.add_metric([g.expert, "ok"], g.rounds_ok)
            rounds.add_metric([g.expert, "failed"], g.rounds_failed)
            sent.add_metric([g.expert], g.bytes_sent)
            if g.outer_step is not None:
                outer.add_metric([g.expert], g.outer_step)
        yield from (online, sps, loss, tokens, rounds, sent, outer)
        yield GaugeMetricFamily(
            "cogen_swarm_peers_online", "Online peers in the swarm", value=snap.peers_online
        )
        yield GaugeMetricFamily(
            "cogen_swarm_samples_per_second", "Training samples/s of the swarm", value=snap.samples_per_second
        )
        yield GaugeMetricFamily(
            "cogen_peers_known", "Peers in the view, online or stale", value=len(snap.peers)
        )
        if snap.generation is not None:
            yield GaugeMetricFamily("cogen_generation", "The current generation", value=snap.generation)
        alerts = GaugeMetricFamily("cogen_alerts", "Current alerts, per kind", labels=["kind"])
        kinds: dict[str, int] = {}
        for a in view.alerts:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        for kind, n in sorted(kinds.items()):
            alerts.add_metric([kind], n)
        yield alerts
        yield GaugeMetricFamily(
            "cogen_monitor_polls", "DHT polls done by the monitor", value=self.monitor.polls
        )
        if self.scraper is not None:
            yield from _relabel(self.scraper.families, {p.id: p.expert for p in snap.peers})


def _relabel(per_peer: dict[str, list[Metric]], experts: dict[str, str]) -> Iterator[Metric]:
    """Merge each node's families into one family per name, with ``peer`` and ``expert`` labels added."""
    merged: dict[str, Metric] = {}
    for peer, families in sorted(per_peer.items()):
        for fam in families:
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif out.type != fam.type:
                continue
            for s in fam.samples:
                labels: dict[str, Any] = {**s.labels, "peer": peer, "expert": experts.get(peer, "")}
                out.add_sample(s.name, labels, s.value, s.timestamp)
    yield from merged.values()


def make_registry(monitor: SwarmMonitor, scraper: NodeScraper | None = None) -> CollectorRegistry:
    """A registry of its own (never the global default one), holding the swarm's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwarmCollector(monitor, scraper))
    return registry
