"""/healthz and /readyz: the checks on a real DHT, a real node process and a real coordinator process."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Peers

from cogen.coordinator.health import CoordinatorHealth
from cogen.core.config import GroupConfig, NetworkConfig, NodeConfig
from cogen.core.health import Check, dht_check, verdict
from cogen.core.procs import ChildFailed, tail, wait_for
from cogen.core.swarm import SwarmClient
from cogen.node.health import NodeHealth
from cogen.node.metrics import NodeMetrics


def probe(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a health endpoint; a 503 is an answer, not an error."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_verdict_names_the_failed_checks() -> None:
    assert verdict([Check("a", True, "fine")]) == (
        200, {"ok": True, "failed": [], "checks": {"a": {"ok": True, "detail": "fine"}}},
    )  # fmt: skip
    status, body = verdict([Check("a", True, "fine"), Check("b", False, "broken")])
    assert status == 503 and body["failed"] == ["b"] and body["checks"]["b"]["detail"] == "broken"


def test_dht_check_on_a_live_and_a_shut_down_dht() -> None:
    client = SwarmClient(NetworkConfig(swarm="health", host="127.0.0.1"))
    try:
        live = dht_check(client.dht)
        assert live.ok and live.name == "dht", live
    finally:
        client.shutdown()
    dead = dht_check(client.dht)
    assert not dead.ok and "not running" in dead.detail
    assert not dht_check(None).ok


def test_node_base_check_allows_one_switch_then_fails() -> None:
    """Behind the newest verified base: ready within the grace of one switch; not after it, nor two behind."""
    now = [100.0]
    follower = SimpleNamespace(generation=0)
    node = SimpleNamespace(
        cfg=NodeConfig(group=GroupConfig(inner_steps=10)), client=None, reporter=None, group=None,
        follower=follower, metrics=None, generation=0,
    )  # fmt: skip
    health = NodeHealth(node, clock=lambda: now[0])  # type: ignore[arg-type]
    base = {c.name: c for c in health.ready()}["base"]
    assert base.ok and "newest" in base.detail
    follower.generation = 1  # fetched and verified; the node moves at its next outer step
    assert health._base().ok
    now[0] += health.grace_s() - 1
    assert health._base().ok
    now[0] += 2
    late = health._base()
    assert not late.ok and "not following the latest base" in late.detail
    node.generation = 1  # switched
    assert health._base().ok
    follower.generation = 3  # two generations ahead: no grace
    assert not health._base().ok
    assert NodeHealth(SimpleNamespace(**{**vars(node), "cfg": NodeConfig(follow=False)}))._base().ok  # type: ignore[arg-type]


def test_node_metrics_serves_health_without_checks() -> None:
    with NodeMetrics(expert="code") as metrics:
        url = metrics.start("127.0.0.1", 0)
        base = url.removesuffix("/metrics")
        assert probe(base + "/healthz") == (200, verdict([Check("process", True, "serving")])[1])
        assert probe(base + "/readyz")[0] == 200
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"cogen_node_steps_total" in response.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/nothing", timeout=10)
        assert e.value.code == 404


def test_coordinator_readiness_waits_for_its_state() -> None:
    """A merging coordinator is not ready until its generations are read back and it announces."""
    monitor = SimpleNamespace(polls=0, is_running=lambda: True)
    facts = SimpleNamespace(
        cfg=SimpleNamespace(view=SimpleNamespace(observer=False)), client=None, monitor=monitor,
        generations=None, announcer=None,
        merges=lambda: True,
    )  # fmt: skip
    status, body = verdict(CoordinatorHealth(facts).ready())  # type: ignore[arg-type]
    assert status == 503 and body["failed"] == ["dht", "view", "generations", "announcing"]


@pytest.mark.slow
def test_a_real_node_is_unready_while_joining_and_ready_once_training(peers: Peers) -> None:
    peers.start_coordinator()
    coordinator = peers.coordinator_info
    assert coordinator is not None
    status, body = probe(coordinator["api_url"] + "/readyz")
    assert status == 200 and set(body["checks"]) == {"api", "monitor", "dht", "view", "announcing"}, body
    assert probe(coordinator["api_url"] + "/healthz")[0] == 200

    node = peers.start_node("node", "code", "--metrics-port", "0", "--max-seconds", "120", "--solo")
    log = peers.log("node")

    def metrics_url() -> str | None:
        found = re.search(r"serving node metrics at (\S+)/metrics", log.read_text() if log.exists() else "")
        return found.group(1) if found else None

    base = wait_for(metrics_url, 60, "node metrics served", interval_s=0.02, alive=[node])
    seen: list[tuple[int, dict[str, Any]]] = []

    def ready() -> bool:
        seen.append(probe(base + "/readyz"))
        return seen[-1][0] == 200

    try:
        wait_for(ready, 90, "node ready", interval_s=0.05, alive=[node])
    except ChildFailed:
        raise AssertionError(f"{seen[-3:]}\n{tail(log)}") from None
    status, first = seen[0]
    assert status == 503 and "training" in first["failed"], first
    assert first["checks"]["training"]["detail"].startswith("joining"), first
    done = seen[-1][1]
    assert done["failed"] == [] and set(done["checks"]) == {"dht", "training", "base"}
    assert "alone" in done["checks"]["training"]["detail"], done
    status, live = probe(base + "/healthz")
    assert status == 200 and live["checks"]["dht"]["ok"], live
    peers.terminate("node")
    assert peers.wait_exit("node") == 0
