"""Shared fixtures: a session cache for built models, tiny-model helpers, and real peer processes.

Multi-peer tests start real ``cogen-coordinator`` / ``cogen-node`` processes on 127.0.0.1 (port 0)
through :class:`Peers`, which waits on conditions with deadlines, always stops what it started and
checks every child's exit code; a session fixture reaps any stray child left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from cogen.core.netns import NetnsUnavailable, Switch, list_namespaces
from cogen.core.procs import read_json, spawn, stop, tail, wait_for

# tests/docker/ needs a Docker engine and the built image: scripts/docker_test.sh (CI's container stage,
# after this suite) provides both and runs it with COGEN_DOCKER_TESTS=1
collect_ignore = [] if os.environ.get("COGEN_DOCKER_TESTS") == "1" else ["docker"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Models built during the session (the tiny model) go to a private cache, inherited by children."""
    path = tmp_path_factory.mktemp("cogen-cache")
    old = os.environ.get("COGEN_CACHE_DIR")
    os.environ["COGEN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("COGEN_CACHE_DIR", None)
    else:
        os.environ["COGEN_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def reap_children() -> Iterator[None]:
    """Kill any child process a test left running, and say which."""
    yield
    # torch's shared-memory manager (started for averaged tensors) belongs to this process and exits
    # with it; killing it makes torch abort at interpreter exit
    leftovers = [c for c in psutil.Process().children(recursive=True) if c.name() != "torch_shm_manager"]
    for child in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            print(f"reaping a stray child process: {child.pid} {child.name()}", file=sys.stderr)
            child.kill()
    psutil.wait_procs(leftovers, timeout=10)


@contextlib.contextmanager
def host_network(hosts: int, rate: str | None = "100mbit") -> Iterator[Switch]:
    """``hosts`` namespace hosts on one bridge (``cogen.core.netns``), always removed; skips without root."""
    try:
        switch = Switch(hosts, rate=rate).create()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    try:
        yield switch
    finally:
        switch.remove()
    assert not set(switch.names) & set(list_namespaces()), "namespaces left behind"


@pytest.fixture(scope="session")
def tiny_path(cache_dir: Path) -> str:
    from cogen.core.models import resolve_model

    return resolve_model("tiny", cache_dir)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


TINY_NODE_ARGS = [
    "--model", "tiny", "--block-size", "32", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1",
    "--threads", "1", "--log-interval-s", "1", "--record-ttl-s", "10", "--num-shards", "4",
]  # fmt: skip


class Peers:
    """Starts cogen processes for one test and always shuts them down."""

    def __init__(self, workdir: Path, swarm: str = "test"):
        self.workdir = workdir
        self.swarm = swarm
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_exit: dict[str, set[int]] = {}
        self.coordinator_info: dict[str, Any] | None = None

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(
        self,
        name: str,
        module: str,
        args: list[str],
        expect_exit: set[int] | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m module args``; ``prefix`` runs it elsewhere (``ip netns exec HOST``)."""
        proc = spawn(module, args, self.log(name), prefix=prefix)
        self.procs[name] = proc
        self.expected_exit[name] = expect_exit if expect_exit is not None else {0}
        return proc

    def start_coordinator(self, *extra: str) -> dict[str, Any]:
        ready = self.workdir / "coordinator.json"
        proc = self.start("coordinator", "cogen.coordinator.cli", [
            "--swarm", self.swarm, "--host", "127.0.0.1", "--port", "0", "--api-port", "0",
            "--ready-file", str(ready), "--poll-interval-s", "0.5", "--record-ttl-s", "10", *extra,
        ])  # fmt: skip
        self.coordinator_info = wait_for(lambda: read_json(ready), 180, "coordinator ready", alive=[proc])
        return self.coordinator_info

    @property
    def initial_peers(self) -> list[str]:
        assert self.coordinator_info is not None
        return list(self.coordinator_info["initial_peers"])

    def api(self, path: str = "/api/swarm") -> Any:
        assert self.coordinator_info is not None
        return get_json(self.coordinator_info["api_url"] + path)

    def start_node(
        self, name: str, expert: str, *extra: str, expect_exit: set[int] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(name, "cogen.node.cli", [
            "--swarm", self.swarm, "--host", "127.0.0.1", "--initial-peers", *self.initial_peers,
            "--expert", expert, "--output-dir", str(self.workdir / name), *TINY_NODE_ARGS, *extra,
        ], expect_exit)  # fmt: skip

    def wait_exit(self, name: str, timeout_s: float = 60) -> int:
        try:
            return self.procs[name].wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} did not exit within {timeout_s} s:\n{tail(self.log(name))}"
            ) from None

    def terminate(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGTERM)

    def shutdown(self) -> None:
        problems = []
        for name, proc in reversed(list(self.procs.items())):
            code = stop(proc, grace_s=30)
            if code not in self.expected_exit[name] and code != -signal.SIGKILL:
                problems.append(f"{name} exited with {code}:\n{tail(self.log(name), 30)}")
        assert not problems, "\n".join(problems)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """When a test that started peer processes fails, its report ends with each process's last log lines
    (CI shows the end of the output: what each peer was doing is there, not only the deadline it missed)."""
    outcome = yield
    report = outcome.get_result()
    group = getattr(item, "funcargs", {}).get("peers")
    if report.when == "call" and report.failed and isinstance(group, Peers):
        tails = [f"--- {name} (pid {proc.pid}, exit {proc.poll()}):\n{tail(group.log(name), 8)}"
                 for name, proc in group.procs.items()]  # fmt: skip
        report.sections.append(("peer process logs (last lines)", "\n".join(tails)))


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    group = Peers(tmp_path)
    try:
        yield group
    finally:
        group.shutdown()
