"""A peer's handle on the swarm: a hivemind DHT with cogen's validators, and typed record I/O.

Every record is stored under ``<swarm>_<kind>`` (its class's ``KIND``) with this peer's RSA public key
as subkey, so only this peer can write it (hivemind's ``RSASignatureValidator`` signs on store and
checks on read) and its schema is checked by :class:`cogen.protocols.CogenRecordValidator` on every peer.
In a permissioned swarm (``NetworkConfig.access``) that key is the member key of its credential, the DHT
runs with a :class:`cogen.core.authorizer.SwarmAuthorizer`, and the averagers on it (such as
:class:`GroupStateAverager`, re-exported from :mod:`cogen.core.averagers`) admit members only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from cogen.core.access import Access
from cogen.core.addresses import (
    announced_host,
    free_port,
    http_url,
    is_loopback,
    is_unspecified,
    peers_elsewhere,
    public_host,
    warn_if_unreachable,
)
from cogen.core.atomic import create_private_once
from cogen.core.authorizer import AccessService, SwarmAuthorizer
from cogen.core.averagers import GroupStateAverager
from cogen.core.config import NetworkConfig
from cogen.core.exit_codes import CommandError, ExitCode
from cogen.protocols import (
    Record,
    swarm_key,
)
from cogen.protocols.records import RECORD_SCHEMAS
from cogen.protocols.validation import RecordRejected, make_validators, parse_record

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)
__all__ = ["Entry", "GroupStateAverager", "NetworkError", "SwarmClient", "ensure_p2p_identity",
           "owner_fingerprint"]  # fmt: skip


class NetworkError(RuntimeError, CommandError):
    """The DHT cannot be started or joined (one-line explanation)."""

    exit_code = ExitCode.NETWORK
    what = "network"


@dataclass(frozen=True)
class Entry(Generic[R]):
    """One peer's record of some kind, as read from the DHT."""

    owner: bytes  # the owner's public-key subkey
    record: R
    expiration_time: float


def _proto(host: str) -> str:
    return "ip6" if ":" in host else "ip4"


def owner_fingerprint(owner: bytes) -> str:
    """A short, stable name for a record owner (the sha256 of its public key)."""
    return hashlib.sha256(owner).hexdigest()[:16]


def ensure_p2p_identity(path: Path) -> Path:
    """The libp2p private key at ``path`` (hivemind's format), created with mode 0600 if missing.

    The key is written inside a fresh private directory next to ``path`` and linked into place
    (:func:`cogen.core.atomic.create_private_once`), so it is never readable by others, not even for a
    moment, and a concurrent creator wins. A key that others
    can read is refused: whoever read it can take this peer's id."""
    path = Path(path)
    if not path.exists() and create_private_once(path, lambda tmp: P2P.generate_identity(str(tmp))):
        logger.info("created the libp2p identity %s (the peer id stays the same across restarts)", path)
    if not path.is_file():
        raise NetworkError(f"the libp2p identity {path} is not a file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise NetworkError(
            f"the libp2p identity {path} is readable by others (mode {mode:o}): whoever read it can take "
            f"this peer's id; chmod 600 it (or delete it for a new id)"
        )
    return path


class SwarmClient:
    """Joins (or starts) a swarm's DHT and reads/writes cogen records.

    With ``identity_path`` the libp2p peer id (and so the multiaddrs others join with) is read from
    that key file, created on first use (:func:`ensure_p2p_identity`): the same after a restart.
    ``rejoin`` are multiaddrs of peers it was connected to before a restart (:meth:`connected_peers`):
    without initial peers it dials them, so a restarted bootstrap peer is back in the swarm (its peers
    dropped it from their routing tables while it was down); none answering is not an error."""

    def __init__(
        self,
        cfg: NetworkConfig,
        *,
        client_mode: bool = False,
        private_key: RSAPrivateKey | None = None,
        identity_path: Path | None = None,
        rejoin: Sequence[str] = (),
    ):
        self.cfg = cfg
        self.access = Access.load(cfg.access, cfg.swarm)  # None: an open swarm
        self.authorizer = SwarmAuthorizer(self.access, cfg.record_ttl_s) if self.access else None
        self.private_key = self.access.member_key if self.access else private_key or RSAPrivateKey()
        self.owner: bytes = RSASignatureValidator(self.private_key).local_public_key
        self.client_mode = client_mode or cfg.client_mode
        port = cfg.port
        announce = None
        if cfg.announce_host and not self.client_mode:
            # hivemind cannot announce port 0: choose the port first, then listen on it and announce it
            port = port or free_port(cfg.host)
            announce = [f"/{_proto(cfg.announce_host)}/{cfg.announce_host}/tcp/{port}"]
        host_maddrs = [f"/{_proto(cfg.host)}/{cfg.host}/tcp/{port}"]
        options: dict[str, Any] = {}
        if identity_path:
            options["identity_path"] = str(ensure_p2p_identity(identity_path))
        initial = list(cfg.initial_peers)
        if rejoin and not initial:
            initial, options["ensure_bootstrap_success"] = list(rejoin), False
        try:
            self.dht = hivemind.DHT(
                initial_peers=initial, host_maddrs=host_maddrs, announce_maddrs=announce,
                client_mode=self.client_mode, record_validators=make_validators(cfg.swarm, self.private_key),
                authorizer=self.authorizer, start=True, await_ready=True, **options,
            )  # fmt: skip
        except Exception as e:  # hivemind raises several types for bad multiaddrs / unreachable peers
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NetworkError(
                f"cannot join the swarm via {list(cfg.initial_peers) or host_maddrs}: {message}"
            ) from e
        self.access_service = AccessService.start_for(self) if self.access else None

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    @property
    def fingerprint(self) -> str:
        return owner_fingerprint(self.owner)

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other peers can use as ``--initial-peers`` (none are dialable in client mode)."""
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def public_host(self) -> str:
        """This peer's address as others reach it: ``--announce-host``, else its DHT's visible address."""
        if self.cfg.announce_host:
            return self.cfg.announce_host
        fallback = "127.0.0.1" if is_unspecified(self.cfg.host) else self.cfg.host
        return public_host(self.visible_maddrs(), fallback)

    def announce_url(
        self, service: str, bind_host: str, port: int, path: str = "", public_url: str | None = None
    ) -> str:
        """The URL to announce for an HTTP service bound to ``bind_host:port`` (never ``0.0.0.0``).

        ``public_url`` (a proxy in front of the service) wins; warns once if the URL is a loopback
        address while the swarm's initial peers are on other machines.
        """
        if public_url:
            return public_url.rstrip("/") + path
        host = announced_host(bind_host, self.cfg.announce_host, self.public_host())
        warn_if_unreachable(service, host, self.cfg.initial_peers)
        return http_url(host, port, path)

    def optional_url(self, service: str, bind_host: str, port: int, path: str = "") -> str | None:
        """:meth:`announce_url`, or None where nobody could reach it (client mode; a loopback address
        while the swarm's peers are elsewhere): an unreachable URL is better not announced at all."""
        if self.client_mode:
            return None
        host = announced_host(bind_host, self.cfg.announce_host, self.public_host())
        if is_loopback(host) and peers_elsewhere(self.cfg.initial_peers):
            logger.info("%s listens on %s only: not announced to peers on other machines", service, host)
            return None
        return http_url(host, port, path)

    def reconnect(self, maddrs: Sequence[str], timeout_s: float = 5.0) -> int:
        """Ping ``maddrs`` (default: the initial peers) so they are in this peer's routing table again.

        hivemind drops a peer that stopped answering (a partition, a restart) from its routing table
        and never looks for it again, so a peer cut off for a while would stay alone after the link is
        back. Returns how many answered; cheap (one ping each), so a service calls it periodically."""
        peer_ids = sorted({m.rsplit("/p2p/", 1)[1] for m in maddrs if "/p2p/" in m})[:64]
        if not peer_ids:
            return 0
        future = self.dht.run_coroutine(functools.partial(_ping, peer_ids, timeout_s), return_future=True)
        try:
            return int(future.result(timeout=timeout_s + 5))
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            return 0

    def connected_peers(self, limit: int = 64, timeout_s: float = 10.0) -> list[str]:
        """Multiaddrs (with ``/p2p/<id>``) of the peers this one is connected to, at most ``limit``; empty
        if the p2p daemon does not answer within ``timeout_s`` (its peer listing can hang)."""
        future = self.dht.run_coroutine(_connected_maddrs, return_future=True)
        try:
            return list(future.result(timeout=timeout_s))[:limit]
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            logger.debug("listing connected peers timed out after %.0f s", timeout_s)
            return []

    def publish(self, record: Record, ttl_s: float | None = None) -> Future[Any]:
        """Store ``record`` under its kind's key and this peer's subkey; returns a future (training never
        waits on it)."""
        kind = getattr(type(record), "KIND", None)
        if kind not in RECORD_SCHEMAS or RECORD_SCHEMAS[kind] is not type(record):
            known = ", ".join(cls.__name__ for cls in RECORD_SCHEMAS.values())
            raise TypeError(f"{type(record).__name__} is not a record of any kind; records are {known}")
        return self.dht.store(
            swarm_key(self.cfg.swarm, kind),
            record.to_wire(),
            expiration_time=get_dht_time() + (ttl_s or self.cfg.record_ttl_s),
            subkey=self.owner,
            return_future=True,
        )

    def fetch(self, schema: type[R]) -> list[Entry[R]]:
        """All unexpired, valid records of ``schema``'s kind (the DHT has already dropped invalid ones)."""
        kind = schema.KIND
        found = self.dht.get(swarm_key(self.cfg.swarm, kind), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        entries = []
        for owner, item in found.value.items():
            try:
                record = parse_record(kind, item.value)
            except RecordRejected as e:  # defensive: never let one bad record break a reader
                logger.debug("skipping a %s record: %s", kind, e)
                continue
            if isinstance(owner, bytes) and isinstance(record, schema):
                entries.append(Entry(owner=owner, record=record, expiration_time=item.expiration_time))
        return entries

    def shutdown(self) -> None:
        if self.access_service is not None:
            self.access_service.stop()
        if self.dht.is_alive():
            self.dht.shutdown()


async def _ping(peer_ids: Sequence[str], timeout_s: float, _dht: hivemind.DHT, node: Any) -> int:
    """Runs in the DHT's process: DHTProtocol.call_ping adds each peer that answers to the routing table."""
    from hivemind.p2p import PeerID

    pings = [node.protocol.call_ping(PeerID.from_base58(p), validate=False) for p in peer_ids]
    try:
        done = await asyncio.wait_for(asyncio.gather(*pings, return_exceptions=True), timeout=timeout_s)
    except TimeoutError:
        return 0
    return sum(1 for d in done if d is not None and not isinstance(d, BaseException))


async def _connected_maddrs(_dht: hivemind.DHT, node: Any) -> list[str]:
    """Runs in the DHT's process (``DHT.run_coroutine``): its libp2p connections as multiaddrs."""
    peers = await asyncio.wait_for(node.p2p.list_peers(), timeout=5.0)
    return [f"{addr}/p2p/{info.peer_id}" for info in peers for addr in info.addrs]
