"""A bare swarm peer for ``test_partition.py``: announces itself every second and prints how many
other peers' records it sees (``sees N``). ``python tests/partition_peer.py READY_FILE [INITIAL...]``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cogen.core.atomic import write_json_atomic
from cogen.core.config import NetworkConfig
from cogen.core.swarm import SwarmClient
from cogen.protocols import SwarmInfo


def main() -> None:
    ready, initial = Path(sys.argv[1]), tuple(sys.argv[2:])
    client = SwarmClient(NetworkConfig(swarm="part", host="0.0.0.0", port=31337, initial_peers=initial,
                                       record_ttl_s=8))  # fmt: skip
    write_json_atomic(ready, {"maddrs": client.visible_maddrs()})
    while True:
        now = time.time()
        peer = client.peer_id
        info = SwarmInfo(
            swarm="part", coordinator_peer_id=peer, software_version="0", started_at=now, updated_at=now
        )
        client.publish(info)
        client.reconnect(client.cfg.initial_peers)  # what NodeReporter.tick does every third of the TTL
        others = [e for e in client.fetch(SwarmInfo) if e.owner != client.owner]
        print(f"sees {len(others)}", flush=True)
        time.sleep(1.0)


if __name__ == "__main__":
    main()
