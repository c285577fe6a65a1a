"""The Docker CLI for the container tests: run containers, read their state and logs, clean up.

Everything a test creates carries the label ``org.cogen.test=docker`` (compose projects: a name that
starts with ``cogentest``), so :func:`remove_leftovers` (run by scripts/docker_test.sh before the
tests, and as a module: ``python tests/docker/docker_engine.py``) removes what a killed run left behind and
nothing else. :class:`Containers` removes what one test made, also when the test fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

LABEL = "org.cogen.test=docker"
COMPOSE_PREFIX = "cogentest"
T = TypeVar("T")

# every node in these tests: the tiny model, small batches, one thread (the machine has 2 cores)
TINY = {
    "COGEN_MODEL": "tiny", "COGEN_BLOCK_SIZE": "32", "COGEN_BATCH_SIZE": "2", "COGEN_LR": "1e-2",
    "COGEN_WARMUP_STEPS": "1", "COGEN_THREADS": "1", "COGEN_LOG_INTERVAL_S": "1", "COGEN_RECORD_TTL_S": "10",
    "COGEN_NUM_SHARDS": "4",
}  # fmt: skip


def env_options(env: dict[str, str]) -> tuple[str, ...]:
    return tuple(arg for key, value in env.items() for arg in ("-e", f"{key}={value}"))


class DockerError(AssertionError):
    """A docker command failed: the command and its last lines of output."""


def docker(*args: str, timeout_s: float = 120, check: bool = True, command: str = "docker") -> str:
    """Run ``docker ARGS`` and return its stdout; raise :class:`DockerError` when it fails."""
    try:
        done = subprocess.run(
            [command, *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise DockerError(f"{command} {' '.join(args)}: no answer within {timeout_s:.0f} s") from None
    if check and done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise DockerError(f"{command} {' '.join(args)} exited {done.returncode}:\n{tail}")
    return done.stdout


def wait_until(
    condition: Callable[[], T | None],
    timeout_s: float,
    what: str,
    interval_s: float = 1.0,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, or fail saying ``what`` did not happen
    (followed by ``details()``, e.g. the containers' last log lines)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout_s:.0f} s" + (f"\n{details()}" if details else "")
            )
        time.sleep(interval_s)


def inspect(name: str) -> dict[str, Any]:
    found = json.loads(docker("inspect", name))
    assert isinstance(found, list) and len(found) == 1, found
    return dict(found[0])


def logs(name: str) -> str:
    """Everything the container wrote (cogen logs to stderr), stdout and stderr together."""
    done = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def health(name: str) -> str:
    """The container's HEALTHCHECK status: starting, healthy or unhealthy."""
    return str(inspect(name)["State"].get("Health", {}).get("Status", "none"))


def read_file(container: str, path: str) -> str | None:
    """A file inside a running container, or None while it does not exist."""
    done = subprocess.run(
        ["docker", "exec", container, "cat", path], capture_output=True, text=True, timeout=30
    )
    return done.stdout if done.returncode == 0 else None


def remove_leftovers() -> None:
    """Remove the containers, volumes and networks of container tests that did not clean up."""
    names = docker("ps", "-aq", "--filter", f"label={LABEL}").split()
    projects = {
        p
        for p in docker("ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}').split()
        if p.startswith(COMPOSE_PREFIX)
    }
    for project in sorted(projects):
        names += docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").split()
    if names:
        docker("rm", "-f", "-v", *names, check=False)
    for kind in ("volume", "network"):
        found = docker(kind, "ls", "-q", "--filter", f"label={LABEL}").split()
        for project in sorted(projects):
            found += docker(
                kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"
            ).split()
        if found:
            docker(kind, "rm", "-f" if kind == "volume" else "--", *found, check=False)


class Containers:
    """The containers, volumes and networks one test creates; :meth:`remove` takes them all away."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.made: dict[str, list[str]] = {"container": [], "volume": [], "network": []}

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def network(self, what: str) -> str:
        name = self.name(what)
        docker("network", "create", "--label", LABEL, name)
        self.made["network"].append(name)
        return name

    def volume(self, what: str) -> str:
        name = self.name(what)
        docker("volume", "create", "--label", LABEL, name)
        self.made["volume"].append(name)
        return name

    def run(self, what: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """``docker run -d`` a container named ``<prefix>-<what>``; return its name."""
        name = self.name(what)
        self.made["container"].append(name)
        docker("run", "-d", "--name", name, "--label", LABEL, *options, image, *args)
        return name

    def remove(self) -> None:
        if self.made["container"]:
            docker("rm", "-f", "-v", *self.made["container"], check=False)
        for kind in ("volume", "network"):
            if self.made[kind]:
                docker(kind, "rm", *self.made[kind], check=False)


if __name__ == "__main__":
    remove_leftovers()
