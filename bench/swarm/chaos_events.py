"""The disturbances of ``bench.swarm.chaos``: kills, a SIGTERM mid-round, a killed coordinator, a
partition and a lost donor, run one after another against a :class:`ChaosSwarm`, with what each measured.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import time

from cogen.core.procs import wait_for

from .chaos_swarm import ChaosSwarm, LogFacts, Member

logger = logging.getLogger("cogen.bench.chaos")


class Disturber:
    """Runs the scenarios against a swarm and keeps what they measured."""

    def __init__(self, swarm: ChaosSwarm, args: argparse.Namespace, deadline: float):
        self.swarm = swarm
        self.args = args
        self.deadline = deadline
        self.rng = random.Random(args.seed)
        self.restarts: list[tuple[Member, int]] = []  # (member, index of the restarted start)
        self.sigterm_exit_s: list[float] = []
        self.events: list[str] = []
        self.failed: list[str] = []  # scenarios that could not be carried out, and why

    def _note(self, what: str) -> None:
        logger.info("chaos: %s", what)
        self.events.append(f"{time.strftime('%H:%M:%S')} {what}")

    def _restart(self, member: Member, after_s: float) -> None:
        time.sleep(after_s)
        self.swarm.start(member)
        self.restarts.append((member, len(member.starts) - 1))
        self._note(f"restarted {member.name}")

    def kill_random_nodes(self) -> None:
        count = 1 if self.args.quick else max(1, int(self.args.kill_phase_s // self.args.kill_every_s))
        for _ in range(count):
            member = self.rng.choice([m for n, m in self.swarm.members.items() if n != "late" and m.alive])
            self.swarm.kill(member)
            self._note(f"SIGKILL {member.name}")
            self._restart(member, self.args.restart_after_s)
            time.sleep(max(0.0, self.args.kill_every_s - self.args.restart_after_s))

    def sigterm_mid_round(self) -> None:
        """Once law-b shows it is averaging, freeze it (the round cannot complete) and SIGTERM law-a,
        which is in that same round: law-a must abandon it, save and exit within its grace period."""
        target, mate = self.swarm.members["law-a"], self.swarm.members["law-b"]
        assert target.proc is not None and mate.proc is not None
        both = (target, mate)
        in_round = lambda: all(self._state(m) == "averaging" for m in both)  # noqa: E731
        wait_for(in_round, 180, "law-a and law-b averaging", interval_s=0.2)
        mate.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)
            self._note("SIGTERM law-a mid-round (law-b frozen)")
            self.sigterm_exit_s.append(self.swarm.terminate(target, grace_s=60))
        finally:
            mate.proc.send_signal(signal.SIGCONT)
        abandoned = "abandon" in target.logs[-1].read_text(errors="replace")
        exit_s = self.sigterm_exit_s[-1]
        self._note(f"law-a exited {exit_s:.1f} s after SIGTERM (round abandoned: {abandoned})")
        self._restart(target, 2.0)

    def _state(self, member: Member) -> str | None:
        facts = LogFacts.read(member.logs[-1])
        try:
            peers = self.swarm.api("/api/peers")
        except OSError:
            return None
        for peer in peers.get("peers", peers) if isinstance(peers, dict) else peers:
            if facts.peer_id and peer.get("peer_id") == facts.peer_id:
                return str(peer.get("state"))
        return None

    def kill_coordinator_mid_merge(self) -> None:
        coordinator = self.swarm.coordinator
        log = coordinator.logs[-1]
        seen = len(log.read_text(errors="replace"))  # only a collection or merge that starts from now on

        def merging() -> bool:
            text = log.read_text(errors="replace")[seen:]
            return "ends: collecting" in text or "merging " in text

        wait_for(merging, self.args.generation_s + 180, "coordinator collecting or merging", interval_s=0.2)
        self.swarm.kill(coordinator)
        self._note("SIGKILL coordinator mid-merge")
        time.sleep(5.0)
        self.swarm.start_coordinator()
        self._note("restarted coordinator")

    def partition(self) -> None:
        host = self.swarm.members["law-b"].host
        self.swarm.switch.partition(host)
        self._note(f"host {host} (law-b) cut off")
        time.sleep(self.args.partition_s)
        self.swarm.switch.heal(host)
        self._note(f"host {host} (law-b) reconnected")

    def kill_donor(self) -> None:
        """The late joiner downloads the group's state over a slow link from med-a (med-b is frozen, so
        med-a is the only member that answers); med-a is SIGKILLed mid-download, med-b thawed."""
        late, donor, other = (self.swarm.members[n] for n in ("late", "med-a", "med-b"))
        assert other.proc is not None
        self.swarm.switch.set_rate(late.host, self.args.joiner_rate)
        other.proc.send_signal(signal.SIGSTOP)
        try:
            self.swarm.start(late)
            self._note(f"started the late joiner on a {self.args.joiner_rate} link; med-b frozen")

            def downloading() -> bool:
                return "looking for the group's state" in late.logs[-1].read_text(errors="replace")

            wait_for(downloading, 180, "the late joiner downloading the group's state", interval_s=0.05)
            time.sleep(1.0)
            self.swarm.kill(donor)
            self._note("SIGKILL med-a, the late joiner's donor, mid-download")
        finally:
            other.proc.send_signal(signal.SIGCONT)
        self.swarm.switch.set_rate(late.host, self.args.rate)
        self._restart(donor, self.args.restart_after_s)

    def run(self) -> None:
        """Each scenario in turn; one that cannot be carried out is recorded as failed, the rest go on."""
        for scenario in (self.kill_random_nodes, self.sigterm_mid_round, self.kill_coordinator_mid_merge,
                         self.partition, self.kill_donor):  # fmt: skip
            if time.monotonic() > self.deadline:
                self.failed.append(f"{scenario.__name__}: the run ended first (give it more --seconds)")
                continue
            try:
                scenario()
            except (RuntimeError, OSError) as e:  # ChildFailed (a wait ran out) is a RuntimeError
                self.failed.append(f"{scenario.__name__}: {e}")
                self._note(f"scenario {scenario.__name__} failed: {e}")
