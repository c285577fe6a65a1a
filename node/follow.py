"""Following the swarm's generations: find a newer signed base, fetch it by hash, verify it, serve it on.

The coordinator publishes every generation as a directory (a Hugging Face checkpoint plus its signed
``manifest.json``), serves it over HTTP and announces it in a :class:`CheckpointSource` record; nodes
that fetched it announce their own copy the same way, so a base can come from any peer that has it.
Trust never comes from a source: :class:`BaseFollower`, in a background thread,

1. reads the CheckpointSource records; the newest generation above the node's own is the candidate;
2. downloads its ``manifest.json``, checks that its sha256 is the announced one and that it is signed by
   the trusted key (``--trusted-key``, else the key the coordinator announces in its SwarmInfo record)
   before it downloads anything else;
3. downloads every file the manifest lists into a temporary directory, hashing as it streams, and checks
   the whole directory with :func:`verify_manifest`; a mismatch is logged and the next source is tried;
4. renames the directory into ``<bases dir>/gen-N-<manifest sha>`` and marks it ready. The node moves to
   it at its next outer step (:meth:`BaseFollower.take`), without restarting.

:class:`MirrorServer` serves the fetched bases read-only over HTTP (the standard library's server).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

from hivemind.utils import get_dht_time
from pydantic import ValidationError

from cogen.periodic import PeriodicService
from cogen.protocols import CheckpointSource, SwarmInfo
from cogen.protocols.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    check_signature,
    read_manifest,
    sha256_file,
    verify_manifest,
)
from cogen.swarm import SwarmClient

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Base:
    """A verified base checkpoint on disk."""

    generation: int
    path: Path
    manifest_sha256: str
    manifest: Manifest


def _safe_name(name: str) -> bool:
    """A manifest's file name must stay inside its directory."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and all(part not in ("", ".", "..") for part in p.parts)


def _download(url: str, dest: Path, timeout_s: float, limit: int | None = None) -> str:
    """Stream ``url`` into ``dest``; returns its sha256. Raises OSError (incl. URLError) on failure."""
    digest = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
        while block := response.read(_CHUNK):
            size += len(block)
            if limit is not None and size > limit:
                raise OSError(f"{url} is larger than {limit} bytes")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def fetch_base(source: CheckpointSource, bases_dir: Path, trusted_key: str, timeout_s: float = 60.0) -> Base:
    """Download and verify the generation ``source`` announces; raise :class:`ManifestError` if it is
    not exactly what the trusted key signed. Reuses a verified copy already in ``bases_dir``."""
    final = Path(bases_dir) / f"gen-{source.generation:06d}-{source.manifest_sha256[:16]}"
    if final.is_dir():
        with contextlib.suppress(ManifestError):
            return _verified(final, source, trusted_key)
        shutil.rmtree(final, ignore_errors=True)  # a corrupt copy: fetch it again
    Path(bases_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=bases_dir))
    base_url = source.url if source.url.endswith("/") else source.url + "/"
    try:
        try:
            digest = _download(base_url + MANIFEST_FILE, tmp / MANIFEST_FILE, timeout_s, MAX_MANIFEST_BYTES)
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot download {base_url}{MANIFEST_FILE}: {e}") from None
        if digest != source.manifest_sha256:
            raise ManifestError(f"{base_url}{MANIFEST_FILE} does not match the announced sha256")
        manifest = _verified_manifest(tmp, source, trusted_key)  # signature first, then the big files
        for name, want in sorted(manifest.files.items()):
            if not _safe_name(name):
                raise ManifestError(f"the manifest names an unsafe path {name!r}")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                got = _download(base_url + name, tmp / name, timeout_s)
            except (OSError, ValueError) as e:
                raise ManifestError(f"cannot download {base_url}{name}: {e}") from None
            if got != want:
                raise ManifestError(f"{base_url}{name} does not match its sha256 in the manifest")
        tmp.chmod(0o755)
        base = _verified(tmp, source, trusted_key)
        try:
            tmp.rename(final)
        except OSError:  # another process sharing the cache got there first
            if final.is_dir():
                return _verified(final, source, trusted_key)
            raise
        return Base(base.generation, final, base.manifest_sha256, base.manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verified_manifest(directory: Path, source: CheckpointSource, trusted_key: str) -> Manifest:
    manifest = read_manifest(directory)
    check_signature(manifest, trusted_key, str(directory / MANIFEST_FILE))
    if manifest.generation != source.generation:
        raise ManifestError(
            f"the manifest is generation {manifest.generation}, announced as {source.generation}"
        )
    return manifest


def _verified(directory: Path, source: CheckpointSource, trusted_key: str) -> Base:
    if sha256_file(directory / MANIFEST_FILE) != source.manifest_sha256:
        raise ManifestError(f"{directory / MANIFEST_FILE} does not match the announced sha256")
    _verified_manifest(directory, source, trusted_key)
    manifest = verify_manifest(directory, trusted_key)
    return Base(manifest.generation, directory, source.manifest_sha256, manifest)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("mirror: " + format, *args)

    def list_directory(self, path: Any) -> None:
        self.send_error(404)  # files are fetched by name from a manifest; no listings


class MirrorServer:
    """Serves ``root`` read-only over HTTP from a background thread (``url`` once started)."""

    def __init__(self, root: Path, host: str, port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="mirror", daemon=True)
        self._thread.start()

        self.public_url: str | None = None  # what peers are told (set by the node: never 0.0.0.0)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """The URL announced for this mirror: ``public_url``, else the address it is bound to."""
        if self.public_url is not None:
            return self.public_url
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BaseFollower(PeriodicService):
    """Watches for newer generations and fetches them; :meth:`take` hands the node a ready base once."""

    def __init__(
        self,
        client: SwarmClient,
        bases_dir: Path,
        generation: int,
        trusted_key: str | None,
        interval_s: float = 5.0,
        mirror: MirrorServer | None = None,
    ):
        super().__init__("base-follower", interval_s)
        self.client = client
        self.bases_dir = Path(bases_dir)
        self.generation = generation  # the newest generation fetched (or trained on)
        self.pinned_key = trusted_key
        self.mirror = mirror
        self._ready: Base | None = None
        self._served: list[Base] = []
        self._lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()  # (url, manifest sha) that failed: not retried

    def has_ready(self) -> bool:
        with self._lock:
            return self._ready is not None

    def take(self) -> Base | None:
        """The newest verified base not handed out yet, or ``None``."""
        with self._lock:
            ready, self._ready = self._ready, None
            return ready

    def trusted_key(self) -> str | None:
        """The pinned key, else the one key the swarm's coordinator announces (none if ambiguous)."""
        if self.pinned_key:
            return self.pinned_key
        keys = {
            e.record.manifest_key
            for e in self.client.fetch("swarm")
            if isinstance(e.record, SwarmInfo) and e.record.manifest_key
        }
        if len(keys) > 1:
            logger.warning(
                "several coordinators announce different manifest keys; pin one with --trusted-key"
            )
            return None
        return next(iter(keys), None)

    def tick(self) -> None:
        self._announce_served()
        sources = [
            e.record
            for e in self.client.fetch("checkpoints")
            if isinstance(e.record, CheckpointSource)
            and e.record.generation > self.generation
            and (e.record.url, e.record.manifest_sha256) not in self._refused
        ]
        if not sources:
            return
        key = self.trusted_key()
        if key is None:
            logger.warning(
                "generation %d is announced but no manifest key is trusted yet", sources[0].generation
            )
            return
        newest = max(s.generation for s in sources)
        candidates = [s for s in sources if s.generation == newest]
        for source in sorted(candidates, key=lambda s: s.time, reverse=True):
            try:
                base = fetch_base(source, self.bases_dir, key)
            except (ManifestError, ValidationError) as e:  # another source may still be good
                logger.warning("refusing generation %d from %s: %s", source.generation, source.url, e)
                self._refused.add((source.url, source.manifest_sha256))
                continue
            logger.info("fetched and verified generation %d from %s", base.generation, source.url)
            with self._lock:
                self._ready = base
                self.generation = base.generation
                self._served.append(base)
            self._announce_served()
            return

    def _announce_served(self) -> None:
        """Tell the swarm this node serves the newest base it fetched (only with a mirror)."""
        if self.mirror is None or not self._served:
            return
        base = self._served[-1]
        self.client.publish(
            "checkpoints",
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
    """``--trusted-key``: the key itself, or a file holding it."""
    if value and not value.startswith("ssh-") and Path(value).is_file():
        return Path(value).read_text().strip()
    return value
