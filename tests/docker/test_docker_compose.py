"""compose.yaml, for real (Debian's docker-compose): the coordinator and the two CPU nodes of the
``cpu`` profile start, the nodes find the coordinator through its ready file and form a group of two
that averages; the dashboard answers on the published port; ``down -v`` removes everything."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_engine import COMPOSE_PREFIX, docker, logs, wait_until

from cogen.core.addresses import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(1200)  # the compose file waits for the coordinator to be healthy
GROUP_ROUND = re.compile(r"medical \| outer step (\d+) applied \| group of 2")


@pytest.fixture
def project(image: str) -> Iterator[dict[str, str]]:
    port = free_port("127.0.0.1")
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"{COMPOSE_PREFIX}{os.getpid()}",
        "COGEN_IMAGE": image,
        "COGEN_MODEL": "tiny",
        "COGEN_SWARM": f"{COMPOSE_PREFIX}{os.getpid()}",
        "COGEN_DASHBOARD_PORT": f"127.0.0.1:{port}",
    }
    try:
        yield env
    finally:
        compose(env, "down", "-v", "--timeout", "60", timeout_s=180)


def compose(env: dict[str, str], *args: str, timeout_s: float = 300) -> str:
    done = subprocess.run(
        ["docker-compose", "--profile", "cpu", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout_s, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"docker-compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    )
    return done.stdout


def service_logs(env: dict[str, str], service: str) -> str:
    """A service's log, read from its container (``docker-compose logs`` takes seconds per call)."""
    return logs(f"{env['COMPOSE_PROJECT_NAME']}_{service}_1")


def dashboard(env: dict[str, str], path: str) -> Any:
    with urllib.request.urlopen(f"http://{env['COGEN_DASHBOARD_PORT']}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_compose_starts_a_coordinator_and_two_nodes_that_form_a_group(project: dict[str, str]) -> None:
    compose(project, "up", "-d", timeout_s=700)  # waits for the coordinator to be healthy
    running = compose(project, "ps", "--services", "--filter", "status=running").split()
    assert {"coordinator", "node-1", "node-2"} <= set(running), running

    def averaged_together() -> bool:
        return all(GROUP_ROUND.search(service_logs(project, s)) for s in ("node-1", "node-2"))

    def last_lines() -> str:
        return "\n".join(
            f"{s}:\n{service_logs(project, s)[-2000:]}" for s in ("coordinator", "node-1", "node-2")
        )

    wait_until(
        averaged_together, 360, "both compose nodes applying an outer step in a group of two", 3, last_lines
    )
    peers = dashboard(project, "/api/swarm")["peers"]
    assert sum(p["expert"] == "medical" for p in peers) == 2, peers
    volumes = docker(
        "volume",
        "ls",
        "-q",
        "--filter",
        f"label=com.docker.compose.project={project['COMPOSE_PROJECT_NAME']}",
    )
    assert {f"{project['COMPOSE_PROJECT_NAME']}_{v}" for v in ("node-1", "node-2", "coordinator")} <= set(
        volumes.split()
    ), volumes
