"""Prometheus metrics: the coordinator's /metrics parses, per expert, and re-exposes nodes' own metrics."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from cogen.coordinator.api import create_app
from cogen.coordinator.schemas import RoundSummary
from cogen.coordinator.scraping import scrape
from cogen.coordinator.view import SwarmMonitor
from cogen.core.config import NetworkConfig
from cogen.core.procs import wait_for
from cogen.core.swarm import SwarmClient
from cogen.node.metrics import NodeMetrics
from cogen.protocols import Hardware, NodeInfo, TrainingProgress, software_version


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the text format (raises on anything malformed) into {(sample name, labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def monitor() -> Iterator[SwarmMonitor]:
    """A real DHT peer that reports itself as a 'code' node, and a monitor over it."""
    client = SwarmClient(NetworkConfig(swarm="metrics", host="127.0.0.1"))
    try:
        now = time.time()
        hw = Hardware(device="cpu", device_name="cpu", memory_bytes=1, cpu_count=1,
                      supports_bf16=False, supports_fp16=False, supports_int8=True)  # fmt: skip
        client.publish(NodeInfo(
            peer_id=client.peer_id, expert="code", hardware=hw, software_version=software_version(),
            model="tiny", precision="int8", shard=0, num_shards=1, state="training", started_at=now,
            updated_at=now,
        )).result()  # fmt: skip
        client.publish(TrainingProgress(
            peer_id=client.peer_id, expert="code", step=3, samples=6, tokens=192, loss=2.5,
            samples_per_second=7.5, peak_memory_bytes=1, time=get_dht_time(),
        )).result()  # fmt: skip
        mon = SwarmMonitor(client)
        wait_for(lambda: mon.poll() or mon.view().snapshot.peers_online == 1, 20, "peer in view")
        yield mon
    finally:
        client.shutdown()


def test_swarm_metrics_parse_and_several_apps_coexist(monitor: SwarmMonitor) -> None:
    monitor.record_round("code", RoundSummary(outer_step=1, finished_at=time.time(), group_size=2,
                                              duration_s=1.0, bytes_sent=1000, ok=True))  # fmt: skip
    monitor.poll()
    first, second = TestClient(create_app(monitor)), TestClient(create_app(monitor))  # one registry each
    response = first.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert samples(second.get("/metrics").text).keys() == got.keys()
    assert got[("cogen_peers_online", (("expert", "code"),))] == 1
    assert got[("cogen_samples_per_second", (("expert", "code"),))] == 7.5
    assert got[("cogen_loss", (("expert", "code"),))] == 2.5
    assert got[("cogen_tokens_total", (("expert", "code"),))] == 192
    assert got[("cogen_averaging_rounds_total", (("expert", "code"), ("result", "ok")))] == 1
    assert got[("cogen_averaging_rounds_total", (("expert", "code"), ("result", "failed")))] == 0
    assert got[("cogen_averaging_bytes_sent_total", (("expert", "code"),))] == 1000
    assert got[("cogen_outer_step", (("expert", "code"),))] == 1
    assert got[("cogen_swarm_peers_online", ())] == 1 and got[("cogen_swarm_samples_per_second", ())] == 7.5
    assert ("cogen_generation", ()) not in got  # no generation yet


def test_node_metrics_are_served_and_parse() -> None:
    """A node's own /metrics (scraped and relabelled by the coordinator: tests/test_scraping.py)."""
    with NodeMetrics(expert="code") as node, NodeMetrics(expert="other") as other:
        url = node.start("127.0.0.1", 0)
        other.start("127.0.0.1", 0)  # a second one in the same process: its own registry
        assert node.is_running() and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        node.set_state("training")
        node.observe_step(loss=2.0, samples=4, tokens=128, seconds=0.5)
        node.observe_step(loss=math.nan, samples=4, tokens=128, seconds=0.5)
        with pytest.raises(ValueError, match="unknown node state"):
            node.set_state("sleeping")
        families = {f.name: f for f in scrape(url)}
        assert {"cogen_node_steps", "cogen_node_loss", "cogen_node_state", "cogen_node_step_seconds"} <= set(
            families
        )
        own = {s.name: s.value for s in families["cogen_node_steps"].samples}
        assert own["cogen_node_steps_total"] == 2
        assert math.isnan(families["cogen_node_loss"].samples[0].value)
    assert not node.is_running()
    with pytest.raises(ValueError, match="not an http URL"):
        scrape("file:///etc/passwd")


def test_a_view_built_before_new_generations_does_not_hide_them(monitor: SwarmMonitor) -> None:
    """A poll that began before a publish (or a restart's read-back of its generations) must not put
    the old list back: the API serves the new one at once, not after the next poll."""
    from cogen.coordinator.schemas import GenerationSummary

    published = GenerationSummary(generation=1, base_hash="b" * 16, parent_hash=None, created_at=time.time(),
                                  manifest_hash="m" * 16, signature_ok=True)  # fmt: skip
    stale_build = monitor._build_view

    def slow_build():  # the poll's build reads the swarm while the generation loop publishes
        view = stale_build()
        monitor.set_generations([published])
        return view

    monitor._keep(slow_build, monitor._changes)
    assert [g["generation"] for g in json.loads(monitor.view().json["generations"])] == [1]
