"""The dashboard's JSON API, page and history against real DHT peers (in this process, on 127.0.0.1)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hivemind.utils import get_dht_time
from pydantic import TypeAdapter

from cogen.coordinator.api import create_app
from cogen.coordinator.history import History
from cogen.coordinator.schemas import (
    AlertList,
    GenerationSummary,
    GroupSummary,
    PeerSummary,
    RoundSummary,
    SwarmSnapshot,
)
from cogen.coordinator.view import SwarmMonitor
from cogen.core.config import NetworkConfig
from cogen.core.procs import wait_for
from cogen.core.swarm import SwarmClient
from cogen.protocols import (
    GroupProgress,
    Hardware,
    NodeInfo,
    RoundReport,
    TrainingProgress,
    software_version,
)

SWARM = "apitest"


def node_info(client: SwarmClient, expert: str, version: str | None = None) -> NodeInfo:
    now = time.time()
    return NodeInfo(
        peer_id=client.peer_id,
        expert=expert,
        hardware=Hardware(
            device="cpu",
            device_name="test <b>cpu</b>",
            memory_bytes=2**30,
            cpu_count=2,
            supports_bf16=False,
            supports_fp16=False,
            supports_int8=True,
        ),
        software_version=version or software_version(),
        model="tiny",
        precision="int8",
        shard=0,
        num_shards=4,
        state="training",
        started_at=now,
        updated_at=now,
    )


def progress(client: SwarmClient, expert: str, step: int, loss: float, **memory: int) -> TrainingProgress:
    return TrainingProgress(
        peer_id=client.peer_id, expert=expert, step=step, samples=2 * step, tokens=64 * step, loss=loss,
        samples_per_second=4.0, peak_memory_bytes=2**20, time=get_dht_time(), **memory,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def dht() -> Iterator[tuple[SwarmClient, SwarmClient, SwarmClient]]:
    """A coordinator-side client and two node clients, all real DHT peers."""
    host = SwarmClient(NetworkConfig(swarm=SWARM, host="127.0.0.1", record_ttl_s=30))
    joined = NetworkConfig(swarm=SWARM, host="127.0.0.1", initial_peers=tuple(host.visible_maddrs()))
    nodes = [SwarmClient(joined), SwarmClient(joined)]
    try:
        yield host, nodes[0], nodes[1]
    finally:
        for client in (*nodes, host):
            client.shutdown()


def _poll_until(monitor: SwarmMonitor, condition: Any, what: str) -> Any:
    def check() -> Any:
        monitor.poll()
        return condition(monitor.view())

    return wait_for(check, 20, what, interval_s=0.2)


def test_api_serves_peers_groups_alerts_and_survives_a_restart(dht, tmp_path: Path) -> None:
    host, medical, legal = dht
    medical.publish(node_info(medical, "medical")).result()
    legal.publish(node_info(legal, "legal", version="0.0.1-old")).result()
    history = History(tmp_path / "history.sqlite3")
    monitor = SwarmMonitor(host, poll_interval_s=0.2, stale_after_s=60, history=history)
    for step, loss in enumerate([3.0, 2.5, math.nan], start=1):
        memory = {"rss_bytes": 300 << 20, "gpu_memory_bytes": 5 << 30}
        medical.publish(progress(medical, "medical", step, loss, **memory)).result()
        legal.publish(progress(legal, "legal", step, 4.0 - step)).result()
        _poll_until(monitor, lambda v, s=step: all(p.step == s for p in v.snapshot.peers) and len(
            v.snapshot.peers) == 2, f"progress step {step}")  # fmt: skip
        time.sleep(0.01)  # DHT time must move on between two reports of one peer
    api = TestClient(create_app(monitor))

    swarm = TypeAdapter(SwarmSnapshot).validate_python(api.get("/api/swarm").json())
    assert swarm.swarm == SWARM and swarm.peers_online == 2 and swarm.generation is None
    peers = {
        p.expert: p for p in TypeAdapter(list[PeerSummary]).validate_python(api.get("/api/peers").json())
    }
    assert set(peers) == {"medical", "legal"} and peers["medical"].loss_is_nan
    assert peers["legal"].software_version == "0.0.1-old" and peers["legal"].device_name == "test <b>cpu</b>"
    # the node's own memory, apart from the machine's total (a node that does not report it: null)
    assert (peers["medical"].rss_bytes, peers["medical"].gpu_memory_bytes) == (300 << 20, 5 << 30)
    assert peers["medical"].memory_bytes == 2**30 and peers["legal"].rss_bytes is None

    groups = {
        g.expert: g for g in TypeAdapter(list[GroupSummary]).validate_python(api.get("/api/groups").json())
    }
    assert groups["medical"].outer_step is None and groups["medical"].last_round is None
    (curve,) = groups["medical"].loss
    assert curve.peer == peers["medical"].id and curve.step == [1, 2, 3] and curve.loss == [3.0, 2.5, None]
    assert groups["legal"].loss[0].loss == [3.0, 2.0, 1.0] and groups["legal"].members == 1
    assert api.get("/api/generations").json() == []

    alerts = AlertList.model_validate(api.get("/api/alerts").json()).alerts
    assert {(a.kind, a.expert) for a in alerts} == {("loss_nan", "medical"), ("version_mismatch", "legal")}
    assert swarm.alert_count == 0 or swarm.alert_count == len(alerts)

    # an averaging round (as the group averaging will report it) shows up everywhere
    failed = RoundSummary(
        outer_step=4, finished_at=time.time(), group_size=2, duration_s=1.5, bytes_sent=4096, ok=False,
        error="timeout",
    )  # fmt: skip
    monitor.record_round("medical", failed)
    monitor.poll()
    group = GroupSummary.model_validate(
        next(g for g in api.get("/api/groups").json() if g["expert"] == "medical")
    )
    assert group.outer_step == 4 and group.last_round is not None and not group.last_round.ok
    assert group.rounds_failed == 1 and group.bytes_sent == 4096
    assert "averaging_failed" in {a["kind"] for a in api.get("/api/alerts").json()["alerts"]}

    # a restarted coordinator reads the curves and rounds back from its history file
    history.close()
    again = SwarmMonitor(host, poll_interval_s=0.2, history=History(tmp_path / "history.sqlite3"))
    _poll_until(again, lambda v: len(v.snapshot.peers) == 2, "restarted monitor sees both peers")
    group = next(g for g in again.view().groups if g.expert == "medical")
    assert group.loss[0].step == [1, 2, 3] and group.outer_step == 4
    assert again.history is not None
    again.history.close()


def group_progress(client: SwarmClient, expert: str, generation: int, outer_step: int) -> GroupProgress:
    report = RoundReport(
        outer_step=outer_step, ok=True, reason="", group_size=2, duration_s=1.0, bytes_sent=1000,
        weight=8.0, time=get_dht_time(),
    )  # fmt: skip
    return GroupProgress(
        peer_id=client.peer_id, expert=expert, outer_step=outer_step, generation=generation, inner_steps=3,
        compression="8bit", rounds_ok=outer_step, rounds_failed=0, last_round=report,
    )  # fmt: skip


def test_rounds_of_each_generation_are_kept_apart(dht, tmp_path: Path) -> None:
    """A group's outer steps start again on a new base: generation 1's round 1 is not generation 0's."""
    host, medical, _ = dht
    history = History(tmp_path / "history.sqlite3")
    monitor = SwarmMonitor(host, poll_interval_s=0.2, history=history)
    medical.publish(node_info(medical, "code")).result()
    expected = [(0, 1), (0, 2), (1, 1)]
    for generation, step in expected:  # what one member reports as its group moves on to generation 1
        medical.publish(group_progress(medical, "code", generation, step)).result()
        _poll_until(monitor, lambda v, g=generation, s=step: any(
            r.last_round and (r.last_round.generation, r.last_round.outer_step) == (g, s)
            for r in v.groups if r.expert == "code"
        ) or None, f"generation {generation}'s round {step}")  # fmt: skip
    group = next(g for g in monitor.view().groups if g.expert == "code")
    assert group.rounds_ok == 3 and group.outer_step == 1  # the current generation's outer step
    rows = sorted((r.generation, r.outer_step) for r in history.rounds(expert="code"))
    assert rows == expected
    history.close()
    # restarted on the same file: every round is back, and none is counted twice
    again = SwarmMonitor(host, poll_interval_s=0.2, history=History(tmp_path / "history.sqlite3"))
    again.poll()
    group = next(g for g in again.view().groups if g.expert == "code")
    assert group.rounds_ok == 3 and group.last_round is not None and group.last_round.generation == 1
    assert again.history is not None
    again.history.close()


def test_openapi_describes_every_endpoint_and_the_page_is_served(dht) -> None:
    host, _, _ = dht
    api = TestClient(create_app(SwarmMonitor(host)))
    spec = api.get("/openapi.json").json()
    refs = {
        path: str(spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
        for path in (
            "/api/swarm",
            "/api/peers",
            "/api/groups",
            "/api/generations",
            "/api/alerts",
            "/api/gate",
        )
    }
    assert "SwarmSnapshot" in refs["/api/swarm"] and "PeerSummary" in refs["/api/peers"]
    assert "GroupSummary" in refs["/api/groups"] and "GenerationSummary" in refs["/api/generations"]
    assert "AlertList" in refs["/api/alerts"] and "GateStatus" in refs["/api/gate"]
    assert api.get("/api/gate").json() == {"published": None, "refused": None}  # nothing merged yet
    schemas = spec["components"]["schemas"]
    assert {"RoundSummary", "LossSeries", "DomainScore", "Alert"} <= set(schemas)
    assert "null" in str(schemas["GroupSummary"]["properties"]["last_round"])  # "no rounds yet" is explicit
    TypeAdapter(list[GenerationSummary]).validate_python(api.get("/api/generations").json())

    page = api.get("/")
    assert page.status_code == 200 and "vendor/plotly.min.js" in page.text and "static/app.js" in page.text
    js = api.get("/vendor/plotly.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    app_js = api.get("/static/app.js").text
    assert "api/groups" in app_js and "Plotly.react" in app_js
    assert api.get("/static/style.css").status_code == 200
    assert api.get("/healthz").json()["observer"] is False
