"""The dashboard in headless Chromium against a live swarm: a coordinator and two tiny nodes (their
rows, memory apart from the machine's, loss charts; a killed node turning stale).

Chromium is Debian's ``chromium`` package (``scripts/test.sh`` installs it), driven by Playwright.
Screenshots go to ``artifacts/`` (``dashboard-live.png`` with both nodes training,
``dashboard.png`` after one was killed).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import Peers, get_json
from playwright.sync_api import Page, sync_playwright

from cogen.core.procs import read_json, wait_for

pytestmark = pytest.mark.slow

#: what the page shows, read from its DOM: peer rows, group charts (points plotted by plotly), alerts
READ_PAGE = """() => ({
  status: document.getElementById("status").className,
  peers: [...document.querySelectorAll("#peers tbody tr[data-peer]")].map((r) => ({
    id: r.dataset.peer, state: r.dataset.state, expert: r.querySelector(".expert").textContent,
    own: r.querySelector(".memory .own").textContent,
    total: r.querySelector(".memory .total").textContent })),
  charts: Object.fromEntries([...document.querySelectorAll(".group")].map((g) => {
    const chart = g.querySelector(".chart");
    const drawn = chart.classList.contains("js-plotly-plot")
      && chart.querySelectorAll(".scatterlayer .trace").length;
    const points = drawn
      ? (chart.data || []).reduce((n, t) => n + t.y.filter((y) => y !== null).length, 0) : 0;
    return [g.dataset.expert, points];
  })),
  alerts: [...document.querySelectorAll("#alerts li[data-kind]")]
    .map((a) => [a.dataset.kind, a.dataset.subject]),
  rounds: [...document.querySelectorAll(".group .round")].map((r) => r.textContent),
  generations: document.getElementById("generations").textContent,
})"""


def read_page(page: Page) -> dict[str, Any]:
    return page.evaluate(READ_PAGE)


def shown_bytes(text: str) -> float:
    """``"1.4 GiB"`` (the dashboard's fmtBytes, maybe after "of ") as a number of bytes."""
    value, unit = text.removeprefix("of ").split()
    return float(value) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)


def test_dashboard_shows_the_live_swarm_and_a_killed_node_turning_stale(peers: Peers, tmp_path: Path) -> None:
    require_chromium()
    info = peers.start_coordinator(
        "--stale-after-s", "4", "--record-ttl-s", "6", "--history-path", str(tmp_path / "history.sqlite3")
    )
    # one node per expert: each trains alone (no groupmate online, so no averaging rounds)
    peers.start_node("node-medical", "medical", "--record-ttl-s", "6")
    peers.start_node("node-legal", "legal", "--record-ttl-s", "6")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.goto(info["api_url"] + "/")

            def live() -> dict[str, Any] | None:
                state = read_page(page)
                ok = sorted(
                    p["expert"] for p in state["peers"] if p["state"] in ("training", "averaging")
                ) == [
                    "legal",
                    "medical",
                ] and all(state["charts"].get(e, 0) >= 2 for e in ("legal", "medical"))
                return state if ok else None

            state = wait_for(
                live, 120, "both peers and their loss charts on the page", 0.5, list(peers.procs.values())
            )
            assert state["status"] == "status live"
            # Memory: each node's own resident memory (not the machine's total), then the machine's total
            machine = psutil.virtual_memory().total
            for p in state["peers"]:
                own, total = shown_bytes(p["own"]), shown_bytes(p["total"])
                assert abs(total - machine) <= 0.06 * 2**30, (p, machine)  # shown to 0.1 GiB
                assert 50 * 2**20 < own < min(total / 2, 4 * 2**30), p  # a tiny node's RSS, not the total
            assert state["rounds"] == ["no averaging rounds yet"] * 2
            assert "no generations yet" in state["generations"]
            # not full_page: that resizes the viewport, and plotly relayouts mid-capture
            page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"))

            # a read-only observer peer (`cogen dashboard`) serves the same view, and announces nothing
            ready = tmp_path / "observer.json"
            observer = peers.start("observer", "cogen.app.cli", [
                "dashboard", "--swarm", peers.swarm, "--host", "127.0.0.1", "--api-port", "0",
                "--initial-peers", *peers.initial_peers, "--ready-file", str(ready),
                "--poll-interval-s", "0.5", "--history-path", str(tmp_path / "observer.sqlite3"),
            ])  # fmt: skip
            url = wait_for(lambda: read_json(ready), 60, "observer ready", alive=[observer])["api_url"]

            def both_seen() -> dict[str, Any] | None:
                snap = get_json(url + "/api/swarm")
                return snap if snap["peers_online"] == 2 else None

            seen = wait_for(both_seen, 60, "observer sees both nodes", 0.5, [observer])
            assert seen["coordinator_peer_id"] != info["peer_id"] and get_json(url + "/healthz")["observer"]
            assert peers.api()["peers_online"] == 2  # the coordinator does not list the observer as a peer

            legal = next(p["id"] for p in state["peers"] if p["expert"] == "legal")
            # SIGKILL the node's whole process group (its session): hivemind's DHT child processes too
            os.killpg(peers.procs["node-legal"].pid, signal.SIGKILL)

            def stale() -> dict[str, Any] | None:
                state = read_page(page)
                rows = {p["id"]: p["state"] for p in state["peers"]}
                return (
                    state if rows.get(legal) == "stale" and ["stale_peer", legal] in state["alerts"] else None
                )

            state = wait_for(
                stale, 30, "the killed node shown stale with an alert", 0.5, [peers.procs["coordinator"]]
            )
            assert {p["expert"]: p["state"] for p in state["peers"]}["medical"] != "stale"
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        finally:
            browser.close()
