"""Downloading one base from one source: bounded by its signed sizes and a deadline, all or nothing.

:func:`fetch_base` downloads the ``manifest.json`` a :class:`CheckpointSource` announces, checks its
sha256 and its signature before anything else, then streams every file the manifest lists into a
staging directory (:func:`cogen.core.atomic.staging_dir`), hashing as it goes, and renames the directory
into the cache only once it verifies as a whole. Every file is bounded:

- by the size the signed manifest declares: reading stops at that size + 1 byte, a longer file is refused
  at once and a shorter one is a failed transfer (a manifest of version 1, without sizes, is bounded by
  ``max_unsized_file_bytes``);
- by a deadline of ``fetch_grace_s`` + size / ``fetch_min_rate`` (a donor that trickles bytes), on top of
  the socket timeout ``fetch_timeout_s`` (a donor that sends nothing);
- and never redirected (:func:`cogen.core.http_client.open_url`): a 3xx is a failed transfer, so a
  source cannot point the node at another host. The manifest is bounded by ``MAX_MANIFEST_BYTES``.

Two kinds of failure, because the caller treats them differently (:mod:`cogen.node.sources`):
:class:`ManifestError` — the source served what the trusted manifest contradicts (wrong sha256, wrong
size, bad signature): the source may be distrusted; :class:`FetchError` — the transfer failed (refused,
timed out, too slow, cut short) or this host could not store it (``local``: disk full): try again later.
Whatever fails, nothing is left in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from cogen.core.atomic import commit_dir, staging_dir
from cogen.core.config import FetchConfig
from cogen.core.http_access import request_for
from cogen.core.http_client import open_url
from cogen.protocols import CheckpointSource
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    check_signature,
    read_manifest,
    verify_manifest,
)

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 1 << 20
_LOUD_FILE_BYTES = 1 << 20  # files at least this big get their own log line


class FetchError(RuntimeError):
    """A transfer failed and may succeed later (one line); ``local``: this host's fault, not the source's."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


@dataclass(frozen=True)
class Base:
    """A verified base checkpoint on disk."""

    generation: int
    path: Path
    manifest_sha256: str
    manifest: Manifest
    downloaded: bool = False  #: fetched now; False: a verified copy this host already had


class _Transfer:
    """One attempt: its limits, its cancel Event, its bytes and time; progress lines every ``interval_s``."""

    def __init__(self, cfg: FetchConfig, cancel: threading.Event | None, interval_s: float):
        self.cfg = cfg
        self.cancel = cancel
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.bytes = 0
        self.files = 0

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{_mb(self.bytes)} in {elapsed:.1f} s ({_mb(self.bytes / max(elapsed, 1e-3))}/s)"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _safe_name(name: str) -> bool:
    """A manifest's file name must stay inside its directory."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and all(part not in ("", ".", "..") for part in p.parts)


def _open(url: str, cfg: FetchConfig) -> http.client.HTTPResponse:
    try:
        # no redirects: a source's URL leads nowhere else; a member's credential rides along
        return open_url(request_for(url), cfg.fetch_timeout_s)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts
        raise FetchError(f"cannot download {url}: {e}") from None


def _stream(url: str, dest: Path, size: int | None, cap: int, transfer: _Transfer) -> str:
    """Stream ``url`` into ``dest``: at most ``size`` (declared) or ``cap`` bytes, before the deadline;
    returns the sha256 of what was read."""
    started = time.monotonic()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(_open(url, transfer.cfg)) as response, open(dest, "wb") as out:
            digest, received = _pump(response, out, url, size, cap, transfer)
            out.flush()
    except OSError as e:  # transfer errors are FetchErrors by now: this is the file (disk full, quota)
        raise FetchError(f"cannot write {dest}: {e}", local=True) from None
    elapsed = time.monotonic() - started
    level = logging.INFO if received >= _LOUD_FILE_BYTES else logging.DEBUG
    rate = _mb(received / max(elapsed, 1e-3))
    logger.log(level, "fetched %s: %s in %.1f s (%s/s)", url, _mb(received), elapsed, rate)
    transfer.files += 1
    return digest


def _pump(
    response: http.client.HTTPResponse,
    out: IO[bytes],
    url: str,
    size: int | None,
    cap: int,
    transfer: _Transfer,
) -> tuple[str, int]:
    """Copy ``response`` to ``out`` within the bounds of :func:`_stream`; returns (sha256, bytes)."""
    cfg, cancel = transfer.cfg, transfer.cancel
    limit = size if size is not None else cap
    what = f"its declared {size} bytes" if size is not None else f"the {cap}-byte cap of unsized files"
    started = last_log = time.monotonic()
    deadline = started + cfg.fetch_grace_s + limit / cfg.fetch_min_rate
    digest, received = hashlib.sha256(), 0
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ManifestError(f"{url} is {length} bytes, more than {what}")
    while True:
        if cancel is not None and cancel.is_set():
            raise FetchError(f"{url}: cancelled", local=True)
        try:
            block = response.read1(min(_CHUNK, limit + 1 - received))  # one recv: a trickle is seen
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(f"{url} failed after {received} bytes: {e}") from None
        if not block:
            break
        received += len(block)
        transfer.bytes += len(block)
        if received > limit:
            raise ManifestError(f"{url} is larger than {what}")
        digest.update(block)
        out.write(block)
        now = time.monotonic()
        if size is None:  # no declared size: the donor must keep up the minimum rate on average
            deadline = started + cfg.fetch_grace_s + (received + _CHUNK) / cfg.fetch_min_rate
        if now > deadline:
            raise FetchError(
                f"{url} is too slow: {received} bytes in {now - started:.0f} s "
                f"(below {cfg.fetch_min_rate / 1e3:.0f} kB/s)"
            )
        if now - last_log >= transfer.interval_s:
            last_log = now
            done = f" of {_mb(size)} ({100 * received / max(size, 1):.0f}%)" if size is not None else ""
            logger.info("fetching %s: %s%s, %s/s", url, _mb(received), done, _mb(received / (now - started)))
    if size is not None and received < size:  # cut short (a shorter Content-Length included): try again
        raise FetchError(f"{url} ended after {received} of {size} bytes")
    return digest.hexdigest(), received


def fetch_base(
    source: CheckpointSource,
    bases_dir: Path,
    trusted_key: str,
    cfg: FetchConfig | None = None,
    cancel: threading.Event | None = None,
    progress_s: float = 10.0,
) -> Base:
    """Download and verify the generation ``source`` announces into ``bases_dir`` (see the module's
    docstring for the bounds and the two errors). Reuses a verified copy already in ``bases_dir``."""
    cfg = cfg or FetchConfig()
    final = Path(bases_dir) / f"gen-{source.generation:06d}-{source.manifest_sha256[:16]}"
    if final.is_dir():
        with contextlib.suppress(ManifestError):
            return _verified(final, source, trusted_key)
        shutil.rmtree(final, ignore_errors=True)  # a corrupt copy: fetch it again
    base_url = source.url if source.url.endswith("/") else source.url + "/"
    transfer = _Transfer(cfg, cancel, progress_s)
    try:
        with staging_dir(Path(bases_dir), final.name) as tmp:
            base = _download_into(tmp, base_url, source, trusted_key, transfer)
            try:
                commit_dir(tmp, final)
            except OSError as e:
                if final.is_dir():  # another process sharing the cache got there first
                    return _verified(final, source, trusted_key)
                raise FetchError(f"cannot store {final}: {e}", local=True) from None
    except FetchError as e:
        raise FetchError(f"{e} (after {transfer.summary()})", e.local) from None
    except ManifestError as e:
        raise ManifestError(f"{e} (after {transfer.summary()})") from None
    logger.info(
        "fetched generation %d from %s: %d files, %s", source.generation, base_url, transfer.files,
        transfer.summary(),
    )  # fmt: skip
    return Base(base.generation, final, base.manifest_sha256, base.manifest, downloaded=True)


def _download_into(
    tmp: Path, base_url: str, source: CheckpointSource, trusted_key: str, transfer: _Transfer
) -> Base:
    digest = _stream(base_url + MANIFEST_FILE, tmp / MANIFEST_FILE, None, MAX_MANIFEST_BYTES, transfer)
    if digest != source.manifest_sha256:
        raise ManifestError(f"{base_url}{MANIFEST_FILE} does not match the announced sha256")
    manifest = _verified_manifest(tmp, source, trusted_key)  # signature first, then the big files
    for name in manifest.files:
        if not _safe_name(name):
            raise ManifestError(f"the manifest names an unsafe path {name!r}")
    for name, want in sorted(manifest.files.items()):
        size, cap = manifest.declared_size(name), transfer.cfg.max_unsized_file_bytes
        got = _stream(base_url + name, tmp / name, size, cap, transfer)
        if got != want:
            raise ManifestError(f"{base_url}{name} does not match its sha256 in the manifest")
    return _verified(tmp, source, trusted_key)


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
