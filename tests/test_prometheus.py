"""docs/prometheus.yml and docs/grafana-dashboard.json against a real Prometheus (Debian's package):
``promtool check config`` accepts the scrape config, and Prometheus, run on 127.0.0.1 with those jobs
pointed at a live coordinator and node, scrapes both (``up`` is 1), stores cogen's metrics, and
answers every query of the Grafana dashboard. Skipped where the prometheus binary is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Peers

from cogen.core.addresses import free_port
from cogen.core.procs import wait_for

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _tools() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus)")
    return prometheus, promtool


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def _config_for(coordinator: str, node: str) -> dict[str, Any]:
    """docs/prometheus.yml with its jobs' targets replaced by live ones, scraped every second."""
    config = yaml.safe_load((DOCS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"cogen-coordinator", "cogen-node"}, jobs
    jobs["cogen-coordinator"]["static_configs"] = [{"targets": [coordinator]}]
    jobs["cogen-node"]["static_configs"] = [{"targets": [node]}]
    return dict(config)


def test_prometheus_scrapes_a_live_coordinator_and_node_and_answers_the_dashboard(
    peers: Peers, tmp_path: Path
) -> None:
    prometheus, promtool = _tools()
    check = subprocess.run([promtool, "check", "config", str(DOCS / "prometheus.yml")], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    coordinator = peers.start_coordinator()
    metrics_port = free_port("127.0.0.1")
    node = peers.start_node(
        "node", "code", "--metrics-port", str(metrics_port), "--solo", "--max-seconds", "300"
    )
    config = tmp_path / "prometheus.yml"
    api = urllib.parse.urlsplit(coordinator["api_url"]).netloc
    config.write_text(yaml.safe_dump(_config_for(api, f"127.0.0.1:{metrics_port}")))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr

    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def scraped() -> bool:
            try:
                up = _query(base, "up")
            except OSError:
                return False  # not listening yet
            return {r["metric"]["job"]: r["value"][1] for r in up} == {
                "cogen-coordinator": "1",
                "cogen-node": "1",
            }

        wait_for(scraped, 120, "prometheus scraping the coordinator and the node", 0.5, alive=[server, node])
        wait_for(
            lambda: any(float(r["value"][1]) > 0 for r in _query(base, "cogen_node_steps_total")),
            120, "the node's steps in prometheus", 0.5, alive=[server, node],
        )  # fmt: skip
        online = _query(base, "cogen_swarm_peers_online")
        assert online and online[0]["metric"]["job"] == "cogen-coordinator", online
        dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert exprs, dashboard
        # every panel's query is valid PromQL over metrics that exist; the node's panels have data
        for expr in exprs:
            _query(base, expr)
        wait_for(lambda: _query(base, "rate(cogen_node_steps_total[5m])"), 60, "a rate over the node's steps")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
