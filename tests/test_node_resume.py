"""Nodes that stop and come back, as real processes on 127.0.0.1: a SIGKILLed node resumes exactly
where it saved, and a SIGTERM in the middle of an averaging round is honoured within the grace period."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from conftest import Peers

from cogen.core.procs import kill_group, tail, wait_for
from cogen.node.resume import digest, find_state

pytestmark = pytest.mark.slow

APPLIED = re.compile(r"outer step (\d+) applied \| group of (\d+)")
SAVED = re.compile(r"saved training state at outer step (\d+), inner step (\d+)")
RESUMED = re.compile(r"resumed generation 0 from (\S+): outer step (\d+), inner step (\d+), weights (\w+)")
PEER = re.compile(r"joined swarm '[^']+' as (\w+)")


def _found(peers: Peers, name: str, pattern: re.Pattern[str]) -> list[tuple[str, ...]]:
    return pattern.findall(peers.log(name).read_text())


def _applied(peers: Peers, name: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in _found(peers, name, APPLIED)]


def _signal_group(peers: Peers, name: str, sig: signal.Signals) -> None:
    """Signal a node and its hivemind processes (DHT, averagers, p2p daemon): SIGSTOP stalls all of it."""
    os.killpg(peers.procs[name].pid, sig)


def test_a_killed_node_resumes_at_its_saved_state_and_its_group_goes_on(peers: Peers) -> None:
    peers.start_coordinator()
    args = ["--inner-steps", "2", "--matchmaking-s", "1.5", "--averaging-timeout-s", "30",
            "--checkpoint-every", "1", "--join-timeout-s", "5", "--compression", "none"]  # fmt: skip
    for name in ("med-a", "med-b"):
        peers.start_node(name, "medical", *args)
    alive = list(peers.procs.values())

    def saved_after_rounds() -> bool:
        rounds = [s for s, size in _applied(peers, "med-a") if size == 2]
        return len(rounds) >= 2 and any(int(o) >= rounds[-1] for o, _ in _found(peers, "med-a", SAVED))

    wait_for(
        saved_after_rounds, 150, "med-a saving its state after two group rounds", interval_s=0.2, alive=alive
    )
    kill_group(peers.procs["med-a"])
    peers.expected_exit["med-a"] = {-9}
    # its groupmate stalls while it is down (as behind a partition): the group cannot get ahead of what
    # med-a saved, so med-a must come back from its own disk
    _signal_group(peers, "med-b", signal.SIGSTOP)
    saved = find_state(peers.workdir / "med-a", "medical", 0, "tiny")
    assert saved is not None and saved.meta.outer_step is not None and saved.meta.outer_step >= 2, saved
    try:
        peers.start_node("med-a2", "medical", *args, "--output-dir", str(peers.workdir / "med-a"))
        resumed = wait_for(lambda: _found(peers, "med-a2", RESUMED), 90, "med-a resuming", interval_s=0.2,
                           alive=[peers.procs["med-a2"]])  # fmt: skip
    finally:
        _signal_group(peers, "med-b", signal.SIGCONT)
    path, outer, inner, weights = resumed[0]
    assert path.endswith(saved.path.name) and int(outer) == saved.meta.outer_step, (resumed, saved.meta)
    assert int(inner) == saved.meta.steps and weights == digest(saved.tensors)  # the saved tensors, exactly
    # the group goes on: both members apply further outer steps together, counting on from the saved one
    before_b = len(_applied(peers, "med-b"))

    def group_goes_on() -> bool:
        a2 = [s for s, size in _applied(peers, "med-a2") if size == 2]
        b = [s for s, size in _applied(peers, "med-b")[before_b:] if size == 2]
        return len(a2) >= 2 and len(b) >= 2

    wait_for(group_goes_on, 150, "the group applying outer steps after the restart", interval_s=0.5,
             alive=[peers.procs["med-a2"], peers.procs["med-b"]])  # fmt: skip
    assert _applied(peers, "med-a2")[0][0] > saved.meta.outer_step
    for name in ("med-a2", "med-b"):
        peers.terminate(name)
    for name in ("med-a2", "med-b"):
        assert peers.wait_exit(name, 60) == 0, tail(peers.log(name))


def test_sigterm_mid_round_saves_and_exits_within_the_grace_period(peers: Peers) -> None:
    peers.start_coordinator()
    grace = 8.0
    # a long gathering phase: without abandoning the round, stopping would take about 25 s
    args = [
        "--inner-steps",
        "2",
        "--matchmaking-s",
        "10",
        "--averaging-timeout-s",
        "60",
        "--grace-s",
        str(grace),
    ]
    for name in ("med-a", "med-b"):
        peers.start_node(name, "medical", *args)
    alive = list(peers.procs.values())
    peer_id = wait_for(lambda: _found(peers, "med-a", PEER), 90, "med-a joining", alive=alive)[0]

    def averaging() -> bool:
        return any(p["peer_id"] == peer_id and p["state"] == "averaging" for p in peers.api()["peers"])

    wait_for(averaging, 150, "med-a in an averaging round", interval_s=0.1, alive=alive)
    _signal_group(peers, "med-b", signal.SIGSTOP)  # the groupmate stalls the round
    try:
        sent = time.monotonic()
        peers.terminate("med-a")
        code = peers.wait_exit("med-a", 60)
        took = time.monotonic() - sent
    finally:
        _signal_group(peers, "med-b", signal.SIGCONT)
    log = peers.log("med-a").read_text()
    assert code == 0 and took < grace, (code, took, tail(peers.log("med-a")))
    assert "stopping: the round was abandoned" in log
    after = log[log.index("received SIGTERM") :]
    assert SAVED.search(after), tail(peers.log("med-a"))
    saved = find_state(peers.workdir / "med-a", "medical", 0, "tiny")
    assert saved is not None and saved.meta.steps >= 2
