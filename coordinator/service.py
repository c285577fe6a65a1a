"""``Coordinator``: runs (or joins) the swarm's DHT, announces the swarm, watches it, serves the API.

It keeps a live view of the swarm (with its history in SQLite), serves the dashboard, the JSON API
and ``/metrics``, and — with ``generation_s`` or ``generation_outer_steps`` — ends generations:
collects the experts from their groups, ranks and merges them, and publishes and serves the next
base (:mod:`cogen.coordinator.generations`). With ``observer=True`` (``cogen dashboard``) it is a
read-only DHT client that announces nothing: the same view and API, for anyone who wants to watch a swarm.

A coordinator keeps its libp2p peer id in a key file (``--p2p-identity``, by default in its out dir when
it merges), so the multiaddr it prints stays valid after a restart; an announcer thread keeps its
records (SwarmInfo, the newest generation's CheckpointSource) fresh whatever the main loop is doing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cogen.coordinator.api import create_app
from cogen.coordinator.api_server import ApiServer
from cogen.coordinator.config import CoordinatorConfig
from cogen.coordinator.generations import GenerationLoop
from cogen.coordinator.health import CoordinatorHealth
from cogen.coordinator.history import History
from cogen.coordinator.merging.manifest import signing_identity
from cogen.coordinator.merging.publish import GENERATIONS
from cogen.coordinator.metrics import make_registry
from cogen.coordinator.scraping import NodeScraper
from cogen.coordinator.view import SwarmMonitor
from cogen.core.atomic import write_json_atomic
from cogen.core.compatibility import check_compatible
from cogen.core.models import cache_root
from cogen.core.periodic import PeriodicService
from cogen.core.procs import read_json
from cogen.core.swarm import SwarmClient
from cogen.protocols import SwarmInfo, software_version

logger = logging.getLogger(__name__)


class Announcer(PeriodicService):
    """Calls ``announce`` every ``interval_s`` in its own thread (records outlive a slow main loop)."""

    def __init__(self, announce: Callable[[], None], interval_s: float):
        super().__init__("announcer", interval_s)
        self._announce = announce

    def tick(self) -> None:
        self._announce()


P2P_IDENTITY_FILE = "p2p-identity.key"
KNOWN_PEERS_FILE = "known-peers.json"  #: next to the identity: whom to dial again after a restart


class Coordinator:
    """The swarm's coordinator. ``run()`` blocks until the stop Event is set."""

    def __init__(self, cfg: CoordinatorConfig, stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.stop_event = stop_event or threading.Event()
        self.started_at = time.time()
        self.client: SwarmClient | None = None
        self.monitor: SwarmMonitor | None = None
        self.api: ApiServer | None = None
        self.history: History | None = None
        self.scraper: NodeScraper | None = None
        self.generations: GenerationLoop | None = None
        self.public_api_url = ""
        self.announcer: Announcer | None = None

    @property
    def name(self) -> str:
        return "cogen dashboard" if self.cfg.view.observer else "cogen-coordinator"

    def history_path(self) -> Path:
        history, swarm = self.cfg.history, self.cfg.network.swarm
        return history.history_path or cache_root(self.cfg.cache.cache_dir) / f"history-{swarm}.sqlite3"

    def stop(self) -> None:
        self.stop_event.set()

    def is_running(self) -> bool:
        return self.api is not None and self.api.is_running()

    def merges(self) -> bool:
        return not self.cfg.view.observer and self.cfg.schedule.ends_generations

    def p2p_identity(self) -> Path | None:
        """The key file that fixes this coordinator's peer id (observers need none)."""
        if self.cfg.view.observer:
            return None
        if self.cfg.keys.p2p_identity is not None:
            return self.cfg.keys.p2p_identity
        return Path(self.cfg.out_dir) / P2P_IDENTITY_FILE if self.merges() else None

    def known_peers_path(self) -> Path | None:
        identity = self.p2p_identity()
        return identity.with_name(KNOWN_PEERS_FILE) if identity is not None else None

    def _known_peers(self) -> list[str]:
        """The peers this coordinator was connected to before it restarted (a bad file: none)."""
        path = self.known_peers_path()
        try:
            data = read_json(path) if path is not None else None
        except (OSError, ValueError) as e:
            logger.warning("ignoring %s: %s", path, e)
            return []
        peers = data.get("peers") if isinstance(data, dict) else None
        if not isinstance(peers, list):
            return []
        return [p for p in peers if isinstance(p, str) and p.startswith("/") and len(p) < 512][:64]

    def _remember_peers(self) -> None:
        path = self.known_peers_path()
        if path is not None and self.client is not None:
            peers = self.client.connected_peers()
            if peers:
                write_json_atomic(path, {"peers": peers})

    def run(self) -> None:
        cfg = self.cfg
        rejoin = self._known_peers()
        if rejoin:
            logger.info("dialling %d peers known from before the restart", len(rejoin))
        self.client = client = SwarmClient(
            cfg.network, client_mode=cfg.view.observer, identity_path=self.p2p_identity(), rejoin=rejoin
        )
        try:
            # only its own earlier announcement counts, not a stranger's (an observer signs nothing)
            check_compatible(
                client, signing_identity(cfg.keys, cfg.cache).public_key if self.merges() else None
            )
            if cfg.history.keep_history:
                self.history = History(
                    self.history_path(), cfg.history.history_max_points, cfg.history.history_retention_s
                )
            self.monitor = SwarmMonitor(
                client, cfg.view.poll_interval_s, cfg.view.stale_after_s, history=self.history
            )
            self.monitor.start()
            self.scraper = NodeScraper(self.monitor, interval_s=max(cfg.view.poll_interval_s, 2.0))
            self.scraper.start()
            merging = self.merges()
            checkpoints = Path(cfg.out_dir) / GENERATIONS if merging else None
            registry = make_registry(self.monitor, self.scraper)
            app = create_app(
                self.monitor, registry, observer=cfg.view.observer, checkpoints_dir=checkpoints,
                served=lambda: self.generations.served() if self.generations is not None else set(),
                health=CoordinatorHealth(self),
            )  # fmt: skip
            self.api = ApiServer(app, cfg.api.api_host, cfg.api.api_port)
            self.api.start()
            if not cfg.view.observer:  # what the swarm is told: reachable from other machines, never 0.0.0.0
                self.public_api_url = client.announce_url(
                    "the coordinator's API and checkpoints",
                    cfg.api.api_host,
                    self.api.port,
                    public_url=cfg.api.public_url,
                )
            if merging:
                self.generations = GenerationLoop(client, cfg, self.monitor, self.public_api_url)
            maddrs = client.visible_maddrs()
            if cfg.view.observer:
                print(f"cogen dashboard: watching swarm {cfg.network.swarm!r} (read-only)", flush=True)
            else:
                self._announce()
                self.announcer = Announcer(self._keep_up, cfg.network.record_ttl_s / 3)
                self.announcer.start()
                print(f"cogen-coordinator: swarm {cfg.network.swarm!r} is up", flush=True)
                print(f"  nodes join with: --initial-peers {' '.join(maddrs)}", flush=True)
            print(
                f"  dashboard: {self.api.url}/  (API: {self.api.url}/api/swarm, {self.api.url}/metrics)",
                flush=True,
            )
            if cfg.api.ready_file is not None:
                write_json_atomic(
                    cfg.api.ready_file,
                    {
                        "initial_peers": maddrs,
                        "api_url": self.api.url,
                        "public_api_url": self.public_api_url,
                        "peer_id": client.peer_id,
                    },
                )
            self._serve()
        finally:
            if self.generations is not None:
                self.generations.wait(timeout_s=5.0)
            for service in (self.announcer, self.api, self.scraper, self.monitor):
                if service is not None:
                    service.stop()
            if self.history is not None:
                self.history.close()
            client.shutdown()
            logger.info("%s stopped", self.name)

    def _keep_up(self) -> None:
        self._announce()
        self._remember_peers()

    def _announce(self) -> None:
        """SwarmInfo and, when merging, the newest generation's CheckpointSource."""
        assert self.client is not None and self.api is not None
        if self.generations is not None:
            self.generations.announce()
        self.client.publish(
            SwarmInfo(
                swarm=self.cfg.network.swarm,
                coordinator_peer_id=self.client.peer_id,
                api_url=self.public_api_url,
                manifest_key=self.generations.manifest_key if self.generations is not None else None,
                owner_signature=self.generations.identity.sign_owner(
                    self.cfg.network.swarm, self.client.owner
                )
                if self.generations is not None
                else None,
                software_version=software_version(),
                model_sha256=self.generations.model_sha256 if self.generations is not None else None,
                started_at=self.started_at,
                updated_at=time.time(),
            ),
        )

    def _serve(self) -> None:
        assert self.monitor is not None
        last_log = time.monotonic()
        while not self.stop_event.wait(1.0):
            if self.generations is not None:
                self.generations.poll()  # collecting needs the main thread; merging runs in the background
            now = time.monotonic()
            if now - last_log >= self.cfg.view.log_interval_s:
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
