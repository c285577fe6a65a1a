"""The ``cpu`` image, for real: a coordinator container and a node container on one Docker network.

The node joins through the coordinator's multiaddr and trains (configured only by ``COGEN_*``
variables); its HEALTHCHECK turns healthy; ``docker stop`` delivers SIGTERM and the node saves its
state within its grace period and exits 0; a new container on the same state volume resumes from it.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from typing import Any

import pytest
from docker_engine import TINY, Containers, docker, env_options, health, inspect, logs, read_file, wait_until

STEP = re.compile(r"medical \| step (\d+) \| loss")
SAVED = re.compile(r"saved training state at outer step (\S+), inner step (\d+) to (\S+)")
RESUMED = re.compile(r"resumed generation 0 from (\S+): outer step (\S+), inner step (\d+)")
GRACE_S = 15
pytestmark = pytest.mark.timeout(900)  # three containers start one after another


def start_coordinator(containers: Containers, image: str, network: str, swarm: str) -> tuple[str, list[str]]:
    """A coordinator container; returns its name and the non-loopback multiaddrs nodes join through."""
    name = containers.run(
        "coordinator", image, "cogen-coordinator", "--ready-file", "/state/ready.json",
        "--poll-interval-s", "0.5",
        options=("--network", network, "-p", "127.0.0.1::8765", "-e", f"COGEN_SWARM={swarm}",
                 "-e", "COGEN_MODEL=tiny", "-e", "COGEN_RECORD_TTL_S=10",
                 "--health-cmd", "python /opt/cogen/bin/container.py health http://127.0.0.1:8765/healthz"),
    )  # fmt: skip

    def ready() -> list[str] | None:
        assert inspect(name)["State"]["Running"], f"the coordinator exited:\n{logs(name)[-3000:]}"
        text = read_file(name, "/state/ready.json")
        if not text:
            return None
        return [p for p in json.loads(text)["initial_peers"] if not p.startswith("/ip4/127.")]

    return name, wait_until(
        ready, 300, "the coordinator writing its ready file", details=lambda: logs(name)[-3000:]
    )


def api(coordinator: str, path: str = "/api/swarm") -> Any:
    """GET the coordinator's API through the port it publishes on the host's loopback."""
    port = docker("port", coordinator, "8765/tcp").split()[0].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_a_node_container_trains_stops_on_sigterm_and_resumes_from_its_volume(
    containers: Containers, image: str
) -> None:
    network = containers.network("net")
    swarm = containers.prefix.replace("-", "")[:32]
    coordinator, maddrs = start_coordinator(containers, image, network, swarm)
    assert maddrs, "the coordinator announced no address other containers can reach"
    state = containers.volume("node-state")
    env = {
        **TINY, "COGEN_SWARM": swarm, "COGEN_EXPERT": "medical", "COGEN_INITIAL_PEERS": " ".join(maddrs),
        "COGEN_GRACE_S": str(GRACE_S), "COGEN_CHECKPOINT_EVERY": "1000", "COGEN_INNER_STEPS": "20",
    }  # fmt: skip
    options = ("--network", network, "-v", f"{state}:/state", *env_options(env))
    node = containers.run("node", image, options=options)

    def trained() -> bool:
        assert inspect(node)["State"]["Running"], f"the node exited:\n{logs(node)[-3000:]}"
        return len(STEP.findall(logs(node))) >= 3

    wait_until(trained, 300, "the node container training", details=lambda: logs(node)[-3000:])
    wait_until(lambda: health(node) == "healthy", 60, "the node's HEALTHCHECK turning healthy",
               details=lambda: json.dumps(inspect(node)["State"].get("Health"))[-2000:])  # fmt: skip
    peer_id = re.search(r"joined swarm '[^']+' as (\w+)", logs(node))
    assert peer_id, logs(node)[-3000:]
    wait_until(
        lambda: any(p["peer_id"] == peer_id[1] for p in api(coordinator)["peers"]),
        60,
        "the coordinator listing the node container",
    )

    started = time.monotonic()
    docker("stop", "--time", str(GRACE_S + 30), node, timeout_s=GRACE_S + 60)
    took = time.monotonic() - started
    out = logs(node)
    assert inspect(node)["State"]["ExitCode"] == 0, out[-3000:]
    assert took < GRACE_S + 10, f"docker stop took {took:.1f} s with a grace period of {GRACE_S} s"
    saved = SAVED.findall(out)
    assert saved, f"no state saved on SIGTERM:\n{out[-3000:]}"
    # checkpoint_every is far off: what was saved, was saved on SIGTERM, at the step it had reached
    last_step = max(int(s) for s in STEP.findall(out))
    assert int(saved[-1][1]) >= last_step, (saved, last_step)

    again = containers.run("node-again", image, options=options)

    def resumed() -> list[tuple[str, ...]]:
        assert inspect(again)["State"]["Running"], f"the new node exited:\n{logs(again)[-3000:]}"
        return RESUMED.findall(logs(again))

    found = wait_until(resumed, 300, "the new container resuming from the state volume",
                       details=lambda: logs(again)[-3000:])  # fmt: skip
    path, _outer, inner = found[0]
    assert path.startswith("/state/") and path.rstrip("/").endswith(
        saved[-1][2].rstrip("/").rsplit("/", 1)[1]
    )
    assert int(inner) == int(saved[-1][1]), (found, saved)
    wait_until(lambda: int(STEP.findall(logs(again))[-1]) > int(inner) if STEP.findall(logs(again)) else None,
               120, "the resumed node training on")  # fmt: skip
