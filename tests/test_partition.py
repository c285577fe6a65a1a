"""A peer cut off from the swarm finds it again once its link is back.

hivemind drops a peer that stops answering from its routing table and never looks for it again, so
without :meth:`cogen.core.swarm.SwarmClient.reconnect` (which every node's record renewal calls) a host
partitioned for half a minute stays alone for good: measured on these namespaces, the cut-off peer
saw 0 other records for the whole 40 s after the heal without it, and the swarm again 11 s after the
heal with it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import host_network

from cogen.core.netns import Switch
from cogen.core.procs import read_json, tail, wait_for

pytestmark = pytest.mark.slow
PEER = Path(__file__).with_name("partition_peer.py")


def _sees(log: Path) -> int:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("sees ")]
    return int(lines[-1].split()[1]) if lines else -1


def _start(net: Switch, host: int, tmp: Path, name: str, *initial: str) -> subprocess.Popen[bytes]:
    log = tmp / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*net.exec_prefix(host), sys.executable, str(PEER), str(tmp / f"{name}.json"), *initial]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_partitioned_peer_finds_the_swarm_again(tmp_path: Path) -> None:
    with host_network(2) as net:
        a = _start(net, 0, tmp_path, "a")
        procs = [a]
        try:
            info = wait_for(lambda: read_json(tmp_path / "a.json"), 60, "peer a ready", alive=[a])
            initial = [m for m in info["maddrs"] if f"/ip4/{net.addresses[0]}/" in m]
            b = _start(net, 1, tmp_path, "b", *initial)
            procs.append(b)
            log = tmp_path / "b.log"
            wait_for(lambda: _sees(log) >= 1, 60, "b sees a", interval_s=0.5, alive=procs)
            net.partition(1)
            wait_for(lambda: _sees(log) == 0, 60, "b alone while cut off", interval_s=0.5, alive=procs)
            time.sleep(15)  # long enough for hivemind to give up on a
            net.heal(1)
            wait_for(lambda: _sees(log) >= 1, 45, "b sees a again after the heal", 0.5, alive=procs)
        except Exception:
            print(tail(tmp_path / "b.log", 30), file=sys.stderr)
            raise
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
