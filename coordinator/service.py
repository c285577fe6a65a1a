"""``Coordinator``: runs (or joins) the swarm's DHT, announces the swarm, watches it, serves the API.

Ranking, merging and publishing generations plug in here in later steps; today the coordinator
keeps a live view of the swarm and serves it at ``/api/swarm``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from cogen.checkpoint import write_json_atomic
from cogen.config import CoordinatorConfig
from cogen.coordinator.api import create_app
from cogen.coordinator.view import SwarmMonitor
from cogen.protocols import SwarmInfo, software_version
from cogen.swarm import NetworkError, SwarmClient, check_compatible

logger = logging.getLogger(__name__)


class ApiServer:
    """uvicorn in a background thread; ``start`` / ``stop`` / ``is_running``."""

    def __init__(self, app: Any, host: str, port: int):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise NetworkError(
                    f"the HTTP API could not listen on {self.server.config.host}:{self.server.config.port}"
                )
            time.sleep(0.05)

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Coordinator:
    """The swarm's coordinator. ``run()`` blocks until the stop Event is set."""

    def __init__(self, cfg: CoordinatorConfig, stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.stop_event = stop_event or threading.Event()
        self.started_at = time.time()
        self.client: SwarmClient | None = None
        self.monitor: SwarmMonitor | None = None
        self.api: ApiServer | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def is_running(self) -> bool:
        return self.api is not None and self.api.is_running()

    def run(self) -> None:
        cfg = self.cfg
        self.client = client = SwarmClient(cfg.network)
        try:
            check_compatible(client)
            self.monitor = SwarmMonitor(client, cfg.poll_interval_s, cfg.stale_after_s)
            self.monitor.start()
            self.api = ApiServer(create_app(self.monitor), cfg.api_host, cfg.api_port)
            self.api.start()
            maddrs = client.visible_maddrs()
            self._announce()
            print(f"cogen-coordinator: swarm {cfg.network.swarm!r} is up", flush=True)
            print(f"  nodes join with: --initial-peers {' '.join(maddrs)}", flush=True)
            print(f"  API: {self.api.url}/api/swarm", flush=True)
            if cfg.ready_file is not None:
                write_json_atomic(
                    cfg.ready_file,
                    {"initial_peers": maddrs, "api_url": self.api.url, "peer_id": client.peer_id},
                )
            self._serve()
        finally:
            if self.api is not None:
                self.api.stop()
            if self.monitor is not None:
                self.monitor.stop()
            client.shutdown()
            logger.info("coordinator stopped")

    def _announce(self) -> None:
        assert self.client is not None and self.api is not None
        self.client.publish(
            "swarm",
            SwarmInfo(
                swarm=self.cfg.network.swarm,
                coordinator_peer_id=self.client.peer_id,
                api_url=self.api.url,
                software_version=software_version(),
                started_at=self.started_at,
                updated_at=time.time(),
            ),
        )

    def _serve(self) -> None:
        assert self.monitor is not None
        last_announce = last_log = time.monotonic()
        while not self.stop_event.wait(1.0):
            now = time.monotonic()
            if now - last_announce >= self.cfg.network.record_ttl_s / 3:
                self._announce()
                last_announce = now
            if now - last_log >= self.cfg.log_interval_s:
                snap = self.monitor.snapshot()
                experts = ", ".join(f"{e.expert}:{e.members}" for e in snap.experts) or "none"
                logger.info(
                    "swarm %s | peers online %d | %.2f samples/s | experts %s",
                    snap.swarm,
                    snap.peers_online,
                    snap.samples_per_second,
                    experts,
                )
                last_log = now
