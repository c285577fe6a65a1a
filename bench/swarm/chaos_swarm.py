"""The swarm ``chaos.py`` disturbs: a coordinator and nodes, each on its own namespace host.

Host 0 runs the coordinator (DHT on a fixed port and a stable identity, so a restarted coordinator is
found at the same multiaddr); every node runs on a host of its own, with its own output dir that
survives its restarts. Processes are real ``cogen-coordinator`` / ``cogen-node`` children started with
``ip netns exec`` (:func:`cogen.core.procs.spawn`); each keeps one log per start (``NAME.N.log``), which is
what the figures are read from (:class:`LogFacts`).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogen.core.netns import Switch
from cogen.core.procs import kill_group, read_json, spawn, stop, wait_for

DHT_PORT = 31337
API_PORT = 8765
APPLIED = re.compile(r"^(\d\d):(\d\d):(\d\d) .*outer step \d+ applied \| group of (\d+)", re.M)
SKIPPED = re.compile(r"outer step \d+ skipped \(([^)]*)\)")
STEP_LOSS = re.compile(r"^(\d\d):(\d\d):(\d\d) .*\| step \d+ \| loss (\S+)", re.M)
ON_GENERATION = re.compile(r"now training on generation (\d+)")
NON_FINITE = re.compile(r"non-finite|not finite|loss nan|loss inf", re.I)
PEER_ID = re.compile(r"joined swarm '[^']*' as (\S+);")


@dataclass
class Member:
    """One node: its host, expert, and the starts it has had."""

    name: str
    host: int
    expert: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)  # wall time of each start
    logs: list[Path] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _seconds(match: re.Match[str]) -> int:
    h, m, s = (int(match.group(i)) for i in (1, 2, 3))
    return h * 3600 + m * 60 + s


def _day_seconds(wall: float) -> int:
    t = time.gmtime(wall)
    return t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec


@dataclass(frozen=True)
class LogFacts:
    """What one start of a node logged."""

    applied: list[tuple[int, int]]  # (seconds of day, group size) per applied outer step
    skipped: list[str]  # reasons of rounds not applied
    losses: list[tuple[int, float]]  # (seconds of day, windowed training loss)
    generations: list[int]  # generations it moved to
    non_finite: int
    peer_id: str | None

    @classmethod
    def read(cls, path: Path) -> LogFacts:
        text = path.read_text(errors="replace") if path.exists() else ""
        peer = PEER_ID.search(text)
        return cls(
            applied=[(_seconds(m), int(m.group(4))) for m in APPLIED.finditer(text)],
            skipped=SKIPPED.findall(text),
            losses=[(_seconds(m), float(m.group(4))) for m in STEP_LOSS.finditer(text)],
            generations=[int(g) for g in ON_GENERATION.findall(text)],
            non_finite=len(NON_FINITE.findall(text)),
            peer_id=peer.group(1) if peer else None,
        )


class ChaosSwarm:
    """Starts, kills and restarts the coordinator and nodes of one run on ``switch``."""

    def __init__(self, switch: Switch, workdir: Path, node_args: list[str], coordinator_args: list[str]):
        self.switch = switch
        self.workdir = workdir
        self.node_args = node_args
        self.coordinator_args = coordinator_args
        self.coordinator = Member("coordinator", 0, "")
        self.members: dict[str, Member] = {}
        self.initial_peers: list[str] = []
        # each run builds its models in its own cache; each node keeps its bases apart, like its own machine
        self.env = {"COGEN_CACHE_DIR": str(workdir / "cache")}

    @property
    def out_dir(self) -> Path:
        return self.workdir / "coordinator-out"

    def api(self, path: str) -> Any:
        """GET the coordinator's API from inside its host."""
        return self.switch.get_json(0, f"http://127.0.0.1:{API_PORT}{path}", timeout_s=5)

    def start_coordinator(self) -> None:
        member = self.coordinator
        ready = self.workdir / f"coordinator.{len(member.starts)}.json"
        log = self.workdir / f"coordinator.{len(member.starts)}.log"
        address = self.switch.addresses[0]
        member.proc = spawn("cogen.coordinator.cli", [
            "--swarm", "chaos", "--host", "0.0.0.0", "--port", str(DHT_PORT), "--announce-host", address,
            "--api-host", "0.0.0.0", "--api-port", str(API_PORT), "--ready-file", str(ready),
            "--out-dir", str(self.out_dir), *self.coordinator_args,
        ], log, env=self.env, prefix=self.switch.exec_prefix(0))  # fmt: skip
        member.starts.append(time.time())
        member.logs.append(log)
        proc = member.proc
        info = wait_for(lambda: read_json(ready), 120, "coordinator ready", interval_s=0.5, alive=[proc])
        self.initial_peers = [m for m in info["initial_peers"] if f"/ip4/{address}/" in m]

    def add(self, name: str, host: int, expert: str, *extra: str) -> Member:
        member = Member(name, host, expert, list(extra))
        self.members[name] = member
        return member

    def start(self, member: Member) -> None:
        log = self.workdir / f"{member.name}.{len(member.starts)}.log"
        member.proc = spawn("cogen.node.cli", [
            "--swarm", "chaos", "--host", "0.0.0.0", "--initial-peers", *self.initial_peers,
            "--expert", member.expert, "--output-dir", str(self.workdir / member.name),
            "--bases-dir", str(self.workdir / member.name / "bases"), *self.node_args, *member.extra,
        ], log, env=self.env, prefix=self.switch.exec_prefix(member.host))  # fmt: skip
        member.starts.append(time.time())
        member.logs.append(log)

    def kill(self, member: Member) -> None:
        if member.proc is not None:
            kill_group(member.proc)
            member.proc.wait()

    def terminate(self, member: Member, grace_s: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds until the process exited."""
        assert member.proc is not None
        t0 = time.monotonic()
        code = stop(member.proc, grace_s=grace_s)
        elapsed = time.monotonic() - t0
        if code != 0:
            raise RuntimeError(f"{member.name} exited with {code} after SIGTERM")
        return elapsed

    def facts(self, member: Member) -> list[LogFacts]:
        return [LogFacts.read(log) for log in member.logs]

    def recovery_s(self, member: Member, start_index: int, solo: bool) -> float | None:
        """Seconds from a restart to its first applied outer step (a solo node: its first inner step)."""
        facts = LogFacts.read(member.logs[start_index])
        events = [t for t, _ in facts.losses] if solo else [t for t, _ in facts.applied]
        if not events:
            return None
        return float((events[0] - _day_seconds(member.starts[start_index])) % 86400)

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for member in [*self.members.values(), self.coordinator]:
            if member.proc is not None:
                codes[member.name] = stop(member.proc, grace_s=40)
        return codes
