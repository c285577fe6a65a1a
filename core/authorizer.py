"""Enforcing a permissioned swarm: hivemind's token authorizer, the member directory, and its upkeep.

- :class:`SwarmAuthorizer` is a hivemind ``TokenAuthorizerBase``: given to ``hivemind.DHT(authorizer=)``,
  every DHT request and response (ping, store, find) carries this peer's credential as the access
  token and is signed with its member key; a request from a peer without a valid, unexpired,
  unrevoked credential is refused by hivemind's ``AuthRPCWrapper`` (so a stranger can neither store
  nor read a record, nor even join the DHT). Refusals are logged (rate-limited).
- Averagers see only a libp2p peer id (authenticated by libp2p's handshake): members announce theirs
  in a :class:`cogen.protocols.MemberInfo` record, and :meth:`SwarmAuthorizer.admits_peer` looks a
  peer id up in that directory (:mod:`cogen.core.averagers` asks it before every averaging RPC).
- :class:`AccessService` republishes this peer's ``MemberInfo`` and the owner's revocation list every
  third of the record TTL and refreshes the DHT process's authorizer: a revocation takes effect
  within one TTL; every member republishes the newest list it has seen, so it outlives its publisher.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase

from cogen.core.access import (
    Access,
    credential_of,
    credential_refusal,
    read_revocations,
    revocations_valid,
    token_of,
)
from cogen.core.periodic import PeriodicService
from cogen.protocols import Credential, MemberInfo, Revocations, swarm_key
from cogen.protocols.validation import RecordRejected, parse_record

if TYPE_CHECKING:
    import hivemind

    from cogen.core.swarm import SwarmClient

logger = logging.getLogger(__name__)
Getter = Callable[[str], Awaitable[Any]]  #: a DHT key -> its ValueWithExpiration (or None), awaited
_LOG_EVERY_S = 30.0  #: each distinct refusal is logged at most this often
_MAX_LOGGED = 1024
_MISS_REFRESH_S = 1.0  #: an unknown peer id refreshes the directory at most this often


class SwarmAuthorizer(TokenAuthorizerBase):
    """Admits the holders of this swarm's credentials; see the module docstring."""

    def __init__(self, access: Access, ttl_s: float):
        super().__init__(access.member_key)
        self.access = access
        self.refresh_s = ttl_s / 3
        self.revocations: Revocations | None = None
        self.revoked: frozenset[int] = frozenset()
        self.members: dict[str, Credential] = {}  # peer id -> its credential
        self._directory_at = -float("inf")
        self._last_logged: dict[str, float] = {}

    # hivemind's TokenAuthorizerBase hooks
    async def get_token(self) -> AccessToken:
        return token_of(self.access.credential)

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.refusal(credential_of(access_token), "DHT request") is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a credential is renewed by its owner, not by this peer

    def refusal(self, credential: Credential | None, action: str) -> str | None:
        """Why ``credential``'s holder may not do ``action`` (logged, rate-limited), or None."""
        a = self.access
        reason = credential_refusal(credential, a.owner_key, a.swarm, self.revoked, time.time())
        if reason is not None:
            self.log_refusal(f"{action}: {reason}")
        return reason

    def log_refusal(self, message: str) -> None:
        now = time.monotonic()
        if len(self._last_logged) > _MAX_LOGGED:  # a stranger cycling peer ids must not grow it forever
            self._last_logged.clear()
        if now - self._last_logged.get(message, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[message] = now
            logger.warning("swarm %r refused a %s", self.access.swarm, message)

    def apply_revocations(self, revocations: Revocations | None) -> None:
        """Keep ``revocations`` if it is the owner's and newer than the list held."""
        if revocations is None or not revocations_valid(
            revocations, self.access.owner_key, self.access.swarm
        ):
            return
        if self.revocations is None or revocations.issued_at > self.revocations.issued_at:
            self.revocations, self.revoked = revocations, frozenset(revocations.serials)

    async def refresh(self, get: Getter) -> None:
        """Re-read the revocation lists and the member directory from the DHT."""
        for _owner, payload in await _entries(get, swarm_key(self.access.swarm, Revocations.KIND)):
            record = _parse(Revocations.KIND, payload)
            self.apply_revocations(record if isinstance(record, Revocations) else None)
        members: dict[str, Credential] = {}
        for owner, payload in await _entries(get, swarm_key(self.access.swarm, MemberInfo.KIND)):
            info = _parse(MemberInfo.KIND, payload)
            # the record's subkey is its writer's key (hivemind's RSASignatureValidator checked the
            # signature): only the credential's holder may announce a peer id for it
            if isinstance(info, MemberInfo) and owner == f"[owner:{info.credential.member_key}]".encode():
                members[info.peer_id] = info.credential
        self.members, self._directory_at = members, time.monotonic()

    async def admits_peer(self, peer_id: str, get: Getter, action: str) -> bool:
        """Whether the peer with libp2p id ``peer_id`` is a member in good standing (refusals logged)."""
        age = time.monotonic() - self._directory_at
        if age > self.refresh_s or (peer_id not in self.members and age > _MISS_REFRESH_S):
            await self.refresh(get)
        credential = self.members.get(peer_id)
        if credential is None:
            self.log_refusal(f"{action} from peer {peer_id}: it announced no member credential")
            return False
        return self.refusal(credential, f"{action} from peer {peer_id}") is None


async def _entries(get: Getter, key: str) -> list[tuple[bytes, Any]]:
    found = await get(key)
    if found is None or not isinstance(found.value, dict):
        return []
    return [(subkey, item.value) for subkey, item in found.value.items() if isinstance(subkey, bytes)]


def _parse(kind: str, payload: Any) -> Any:
    try:
        return parse_record(kind, payload)
    except RecordRejected:
        return None


_AUTHORIZERS: weakref.WeakKeyDictionary[hivemind.DHT, SwarmAuthorizer] = weakref.WeakKeyDictionary()
_AUTHORIZERS_LOCK = threading.Lock()


def register_authorizer(dht: hivemind.DHT, authorizer: SwarmAuthorizer) -> None:
    """Remember that ``dht`` runs in a permissioned swarm, for the averagers built on it."""
    with _AUTHORIZERS_LOCK:
        _AUTHORIZERS[dht] = authorizer


def authorizer_for(dht: hivemind.DHT) -> SwarmAuthorizer | None:
    """The authorizer ``dht`` was started with by :class:`cogen.core.swarm.SwarmClient` (None: open)."""
    with _AUTHORIZERS_LOCK:
        return _AUTHORIZERS.get(dht)


async def _refresh_in_dht(
    revocations: Revocations | None, _dht: hivemind.DHT, node: Any
) -> Revocations | None:
    """Runs in the DHT's process (``DHT.run_coroutine``): refresh the authorizer that guards its RPCs
    (``DHTProtocol.authorizer``) and return the newest revocation list it holds."""
    authorizer = node.protocol.authorizer
    if not isinstance(authorizer, SwarmAuthorizer):
        return None
    authorizer.apply_revocations(revocations)
    await authorizer.refresh(functools.partial(node.get, latest=True))
    return authorizer.revocations


class AccessService(PeriodicService):
    """Every third of the record TTL: announce this member, publish the newest revocation list,
    refresh the DHT process's authorizer (start/stop/is_running)."""

    def __init__(self, client: SwarmClient, access: Access):
        super().__init__("access", client.cfg.record_ttl_s / 3)
        self.client, self.access = client, access

    @classmethod
    def start_for(cls, client: SwarmClient) -> AccessService:
        """Register ``client``'s authorizer for its averagers and start the upkeep."""
        assert client.access is not None and client.authorizer is not None
        from cogen.core.http_access import register  # it imports this module

        register_authorizer(client.dht, client.authorizer)
        register(client.access, client.authorizer)  # checkpoint downloads over HTTP
        service = cls(client, client.access)
        service.start()
        return service

    def stop(self, timeout_s: float = 10.0) -> None:
        from cogen.core.http_access import unregister

        super().stop(timeout_s)
        unregister(self.access)

    def tick(self) -> None:
        client, access = self.client, self.access
        info = MemberInfo(credential=access.credential, peer_id=client.peer_id, time=time.time())
        client.publish(info)
        own = None
        if access.revocations is not None:  # the owner's file: re-read, so a new revocation needs no restart
            own = read_revocations(access.revocations, access.owner_key, access.swarm)
        future = client.dht.run_coroutine(functools.partial(_refresh_in_dht, own), return_future=True)
        try:
            newest = future.result(timeout=max(5.0, self.interval_s))
        except TimeoutError:
            future.cancel()
            return
        if newest is not None:
            client.publish(newest)
            if client.authorizer is not None:  # this process's copy, which checks HTTP downloads
                client.authorizer.apply_revocations(newest)
