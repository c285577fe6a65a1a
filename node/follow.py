"""Following the swarm's generations: find a newer signed base, fetch it by hash, verify it, serve it on.

The coordinator publishes every generation as a directory (a Hugging Face checkpoint plus its signed
``manifest.json``), serves it over HTTP and announces it in a :class:`CheckpointSource` record; nodes
that fetched it announce their own copy the same way, so a base can come from any peer that has it.
Trust never comes from a source: :class:`BaseFollower`, in a background thread,

1. reads the CheckpointSource records of generations above the node's own, drops the implausible ones
   (a generation more than one above the newest the coordinator announces, a time more than
   ``MAX_CLOCK_SKEW_S`` ahead) and orders the rest (:class:`cogen.node.sources.SourceBook`: the
   coordinator's manifests first, newest generation first, sources backing off or distrusted left out);
2. tries them in that order with :func:`cogen.node.fetch.fetch_base`: the manifest's sha256 must be the
   announced one and its signature the trusted key's (``--trusted-key``, else the coordinator's key
   pinned on first use: :mod:`cogen.node.trust`, which also says which SwarmInfo records are the
   coordinator's) before anything else is downloaded; every file is bounded by its signed size and a
   deadline, hashed as it streams, and the directory is checked as a whole;
3. a source whose transfer failed is tried again after an exponential, jittered backoff; one that served
   content its signed manifest contradicts is skipped for ``--distrust-s``; the next source is tried;
4. the verified directory is renamed into ``<bases dir>/gen-N-<manifest sha>`` (nothing partial is ever
   left there: staging directories of a killed process are removed when the follower starts) and marked
   ready. The node moves to it at its next outer step (:meth:`BaseFollower.take`), without restarting.

:class:`MirrorServer` serves the fetched bases read-only over HTTP (the standard library's server, with
the lifecycle of :class:`cogen.core.http_service.ServerThread`).
"""

from __future__ import annotations

import functools
import logging
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

from hivemind.utils import get_dht_time
from pydantic import ValidationError

from cogen.core.atomic import remove_stale_staging
from cogen.core.config import FetchConfig
from cogen.core.http_access import checkpoint_refusal
from cogen.core.http_service import HttpServer
from cogen.core.periodic import PeriodicService
from cogen.core.swarm import SwarmClient
from cogen.node.fetch import MAX_MANIFEST_BYTES, Base, FetchError, fetch_base
from cogen.node.sources import SourceBook
from cogen.node.trust import KeyTrust, read_trusted_key
from cogen.protocols import CheckpointSource, SwarmInfo
from cogen.protocols.manifest import MANIFEST_FILE, ManifestError, read_manifest
from cogen.protocols.records import from_the_future

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Base",
    "BaseFollower",
    "FetchError",
    "MirrorServer",
    "fetch_base",
    "generation_of",
    "read_key",
]

logger = logging.getLogger(__name__)
_MAX_REFUSALS_LOGGED = 1024  # refused announcements remembered (so each is logged once) at most


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("mirror: " + format, *args)

    def list_directory(self, path: Any) -> None:
        self.send_error(404)  # files are fetched by name from a manifest; no listings

    def send_head(self) -> Any:
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).split("/")
        if any(part.startswith(".") for part in parts):  # a base still being downloaded, or junk
            self.send_error(404)
            return None
        if refusal := checkpoint_refusal(self.headers.items(), self.path):  # --checkpoint-auth
            self.send_error(403, refusal)
            return None
        return super().send_head()


class MirrorServer(HttpServer):
    """Serves ``root`` read-only over HTTP from a background thread: ``start`` / ``stop`` / ``is_running``
    (``url`` once started); no listings, no hidden paths (a base still being downloaded)."""

    def __init__(self, root: Path, host: str, port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(
            functools.partial(_QuietHandler, directory=str(self.root)), host, port, name="mirror"
        )
        self.public_url: str | None = None  # what peers are told (set by the node: never 0.0.0.0)

    @property
    def url(self) -> str:
        """The URL announced for this mirror: ``public_url``, else the address it is bound to."""
        return self.public_url if self.public_url is not None else f"{self.url_base}/"


class BaseFollower(PeriodicService):
    """Watches for newer generations and fetches them; :meth:`take` hands the node a ready base once."""

    def __init__(
        self,
        client: SwarmClient,
        bases_dir: Path,
        generation: int,
        trusted_key: KeyTrust | str | None,
        interval_s: float = 5.0,
        mirror: MirrorServer | None = None,
        fetch: FetchConfig | None = None,
    ):
        super().__init__("base-follower", interval_s)
        self.client = client
        self.bases_dir = Path(bases_dir)
        self.generation = generation  # the newest generation fetched (or trained on)
        #: a key (given), or None: the first coordinator key seen, pinned in memory (the node passes a
        #: KeyTrust that pins it in its output dir)
        self.trust = trusted_key if isinstance(trusted_key, KeyTrust) else KeyTrust(read_key(trusted_key))
        self._refused: set[tuple[bytes, int, str]] = set()
        self._said_untrusted = False
        self.mirror = mirror
        self.fetch_cfg = fetch or FetchConfig()
        self.sources = SourceBook(self.fetch_cfg)
        self._ready: Base | None = None
        self.looked = threading.Event()  # set once the first look at the swarm's generations is done
        self.looks = 0  #: looks done so far
        self._served: list[Base] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for stale in remove_stale_staging(self.bases_dir):
            logger.info("removed %s, left by an interrupted download", stale)
        super().start()

    def has_ready(self) -> bool:
        with self._lock:
            return self._ready is not None

    def take(self) -> Base | None:
        """The newest verified base not handed out yet, or ``None``."""
        with self._lock:
            ready, self._ready = self._ready, None
            return ready

    def trusted_key(self) -> str | None:
        """The key manifests must be signed by: given, pinned, or none known yet."""
        return self.trust.key

    def tick(self) -> None:
        try:
            self._look()
        finally:
            self.looks += 1
            self.looked.set()

    def _look(self) -> None:
        self._announce_served()
        records = [(e.owner, e.record) for e in self.client.fetch(CheckpointSource)]
        if not any(s.generation > self.generation for _, s in records):
            return
        coordinators = self.trust.coordinators(self.client.cfg.swarm, self.client.fetch(SwarmInfo))
        key = self.trust.key
        if key is None:
            if not self._said_untrusted:  # once: the coordinator may take a while to announce itself
                self._said_untrusted = True
                logger.warning(
                    "a generation above %d is announced but no manifest key is trusted yet (no coordinator "
                    "announces one, or several do: pass --trusted-key)", self.generation,
                )  # fmt: skip
            return
        announced = self._bounded(records, coordinators)
        endorsed = {(s.generation, s.manifest_sha256) for owner, s in announced if owner in coordinators}
        for source in self.sources.order(announced, endorsed):
            if self.stopping:
                return
            if self._try(source, key):
                return

    def _bounded(
        self, records: list[tuple[bytes, CheckpointSource]], coordinators: set[bytes]
    ) -> list[tuple[bytes, CheckpointSource]]:
        """The records above this node's generation that are plausible: at most one generation above the
        newest the coordinator announces (or this node's, before it does), and not from the future."""
        newest = max((s.generation for owner, s in records if owner in coordinators), default=0)
        limit, now = max(newest, self.generation) + 1, get_dht_time()
        kept = []
        for owner, source in records:
            if source.generation <= self.generation:
                continue
            if source.generation > limit:
                self._refuse(owner, source, f"generation {source.generation} is above {limit}")
            elif from_the_future(source.time, now):
                self._refuse(owner, source, f"its time is {source.time - now:.0f} s in the future")
            else:
                kept.append((owner, source))
        return kept

    def _refuse(self, owner: bytes, source: CheckpointSource, why: str) -> None:
        """Log a refused announcement once (per owner, generation and url)."""
        tag = (owner, source.generation, source.url)
        if tag in self._refused or len(self._refused) >= _MAX_REFUSALS_LOGGED:
            return
        self._refused.add(tag)
        logger.warning("ignoring the announced source %s of generation %d: %s", source.url,
                       source.generation, why)  # fmt: skip

    def _try(self, source: CheckpointSource, key: str) -> bool:
        """One attempt at ``source``; True once its base is fetched, verified and ready."""
        try:
            base = fetch_base(
                source, self.bases_dir, key, self.fetch_cfg, cancel=self._stop, progress_s=self.interval_s
            )
        except FetchError as e:
            if self.stopping:
                return False
            if e.local:
                delay = self.sources.local_failed()
                logger.warning(
                    "cannot fetch generation %d: %s; trying again in %.0f s", source.generation, e, delay
                )
                return True  # every other source would fail here as well
            delay = self.sources.transfer_failed(source)
            logger.warning(
                "fetching generation %d from %s failed: %s; trying that source again in %.0f s",
                source.generation, source.url, e, delay,
            )  # fmt: skip
            return False
        except (ManifestError, ValidationError) as e:
            delay = self.sources.distrust(source)
            logger.warning(
                "refusing generation %d from %s: %s; skipping that source for %.0f s",
                source.generation, source.url, e, delay,
            )  # fmt: skip
            return False
        self.sources.succeeded(source)
        if base.downloaded:
            logger.info("fetched and verified generation %d from %s", base.generation, source.url)
        else:
            logger.info("generation %d: the verified copy already in %s", base.generation, base.path)
        with self._lock:
            self._ready = base
            self.generation = base.generation
            self._served.append(base)
        self._announce_served()
        return True

    def _announce_served(self) -> None:
        """Tell the swarm this node serves the newest base it fetched (only with a mirror)."""
        if self.mirror is None or not self._served:
            return
        base = self._served[-1]
        self.client.publish(
            CheckpointSource(
                peer_id=self.client.peer_id,
                generation=base.generation,
                manifest_sha256=base.manifest_sha256,
                url=f"{self.mirror.url}{base.path.relative_to(self.mirror.root).as_posix()}/",
                time=get_dht_time(),
            ),
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        if self.mirror is not None:
            self.mirror.stop()


def generation_of(model_path: str) -> int:
    """The generation of a base: from its manifest when it is a published one, else 0."""
    if not (Path(model_path) / MANIFEST_FILE).is_file():
        return 0
    try:
        return read_manifest(Path(model_path)).generation
    except ManifestError as e:
        logger.warning("%s", e)
        return 0


def read_key(value: str | None) -> str | None:
    """``--trusted-key``: the key itself, or a file holding it (:func:`cogen.node.trust.read_trusted_key`)."""
    return read_trusted_key(value) if value else None
