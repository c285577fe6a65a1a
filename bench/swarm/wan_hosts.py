"""The WAN benchmark's hosts: delays on the links, processes in namespaces, and the metrics scraper.

:func:`scrape` is the child ``python -m bench.swarm.wan --worker scrape`` runs inside a node's namespace;
:class:`Procs` starts children inside namespaces and always kills them; the rest reads what they wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cogen.core.netns import Switch

from ..harness import BenchError, child_env

# ----------------------------------------------------------------- the child: scrape one node's metrics


def scrape(url: str, out: Path, interval_s: float, max_s: float) -> None:
    """Append (time, steps, Σ step seconds, state) of ``url`` to ``out`` as JSON lines until the node
    stops serving (its port refuses for 5 s after it served once) or ``max_s`` passes."""
    from prometheus_client.parser import text_string_to_metric_families

    seen, deadline = False, time.monotonic() + max_s
    refused_since: float | None = None
    with open(out, "a") as f:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    text = response.read().decode()
            except OSError as e:  # a slow answer (a busy node) is retried; a closed port for 5 s ends it
                refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
                if not refused:
                    refused_since = None
                elif refused_since is None:
                    refused_since = time.monotonic()
                elif seen and time.monotonic() - refused_since > 5:
                    return
                time.sleep(interval_s)
                continue
            refused_since = None
            seen = True
            row: dict[str, Any] = {"t": time.time()}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "cogen_node_steps_total":
                        row["steps"] = s.value
                    elif s.name == "cogen_node_step_seconds_sum":
                        row["sum"] = s.value
                    elif s.name == "cogen_node_state" and s.value == 1:
                        row["state"] = s.labels.get("cogen_node_state", "")
            f.write(json.dumps(row) + "\n")
            f.flush()
            time.sleep(interval_s)


# ----------------------------------------------------------------- the parent: links, processes, figures


def netem_available(switch: Switch) -> bool:
    """Whether this kernel can add a ``netem`` qdisc (tried on the switch namespace's loopback)."""
    probe = ["ip", "netns", "exec", switch.switch, "tc", "qdisc", "add", "dev", "lo", "root", "netem"]
    ok = subprocess.run([*probe, "delay", "1ms"], capture_output=True, timeout=30).returncode == 0
    if ok:
        subprocess.run(
            [*probe[:5], "tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, timeout=30
        )
    return ok


def add_delay(switch: Switch, peer: int, delay_ms: float) -> None:
    """Put ``netem delay`` under the ``tbf`` on both ends of peer ``peer``'s link."""
    for namespace, dev in ((switch.names[peer], "eth0"), (switch.switch, f"p{peer}")):
        shown = subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", dev],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        found = re.search(r"qdisc tbf (\w+):", shown)
        if found is None:
            raise BenchError(f"no tbf qdisc on {dev} in {namespace}: {shown.strip()}")
        subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, "parent", f"{found[1]}:1",
             "handle", "10:", "netem", "delay", f"{delay_ms:g}ms"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip


class Procs:
    """Children run inside namespaces, each in its own session; ``close()`` always kills them all."""

    def __init__(self, switch: Switch, log_dir: Path):
        self.switch, self.log_dir = switch, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, peer: int, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [*self.switch.exec_prefix(peer), sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                env={**child_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left, hivemind's helpers included
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def wait_for(condition: Any, timeout_s: float, what: str, procs: Procs, names: list[str]) -> Any:
    """cogen's ``wait_for``, failing with a BenchError (and the dead process's log tail)."""
    from cogen.core.procs import ChildFailed
    from cogen.core.procs import wait_for as wait

    try:
        return wait(condition, timeout_s, what, 0.25, [procs.procs[n] for n in names])
    except ChildFailed as e:
        dead = [n for n in names if procs.procs[n].poll() is not None]
        raise BenchError(f"{e}\n{procs.tail(dead[0])}" if dead else str(e)) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def last_row(path: Path) -> dict[str, Any]:
    rows = read_rows(path)
    return rows[-1] if rows else {}
