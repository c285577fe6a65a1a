"""The members of a round hand each other their round data directly, over the DHT's libp2p daemon.

hivemind's butterfly all-reduce never shows a member another's delta, so neither a robust aggregate
nor a check made after the round (the nonce reveal of :mod:`cogen.node.wire`) can go through it.
:class:`RoundExchange` composes hivemind's public API instead, and all of it runs in the DHT's own
process through ``DHT.run_coroutine`` (as :mod:`cogen.core.swarm`'s pings do): there, one streaming
protobuf handler (``P2P.add_protobuf_handler`` on the DHT node's own ``p2p``, named by
:func:`cogen.protocols.keys.exchange_name`) serves this member's posts, and the other members' are
fetched with ``P2P.iterate_protobuf_handler``. The node's process holds no libp2p client, event loop or
thread of its own for it: nothing of the exchange outlives a group but the handler, which ``stop``
removes.

What a member serves for a round is a *post* (:meth:`RoundExchange.post`): small metadata (msgpack,
never pickle) and optionally serialized tensors (hivemind's ``serialize_torch_tensor``, 64 KiB
chunks), kept under the member's round commitment and given only to the peers of that round
(libp2p authenticates the caller's peer id). A request that comes before the post waits for it, up
to a deadline. :meth:`RoundExchange.fetch` asks every given peer at once, bounded in bytes per peer
(``max_bytes``) and in time, and returns what each sent, or why not: deciding what to do with a
missing or oversized answer is the caller's job. Serialized tensors cross between the node's process
and the DHT's as one byte tensor in shared memory (:func:`~cogen.node.exchange_server.pack`), so the
DHT's pipe carries only small messages, whatever the size of a delta.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from cogen.node import exchange_server as server
from cogen.node.exchange_server import pack, unpack

logger = logging.getLogger(__name__)

CALL_SLACK_S = 15.0  # how much longer than its own deadline a call into the DHT's process may take


@dataclass
class Post:
    """One round's data as this member serves it."""

    peers: frozenset[str]  # who may fetch it: the round's members
    metadata: dict[str, Any]
    tensors: Sequence[runtime_pb2.Tensor] = ()


@dataclass
class Received:
    """What one peer served: its metadata (unparsed, from a peer) and its serialized tensors."""

    metadata: Any
    tensors: list[runtime_pb2.Tensor] = field(default_factory=list)


class RoundExchange:
    """Serves this member's round posts and fetches the other members' (from the DHT's process)."""

    def __init__(self, dht: DHT, name: str, max_bytes: int, wait_s: float = 30.0):
        self.dht, self.name, self.max_bytes, self.wait_s = dht, name, max_bytes, wait_s
        self._running = False

    def start(self) -> None:
        self._call(functools.partial(server.register, self.name, self.wait_s), timeout=30.0)
        self._running = True

    def is_running(self) -> bool:
        return self._running

    def stop(self, linger_s: float = 0.0) -> None:
        """Stop serving; with ``linger_s``, first wait up to that long until every member of the latest
        round fetched this member's posts of it (one that leaves right after a round would otherwise
        refuse its groupmates that round)."""
        if not self._running:
            return
        self._running = False
        try:
            self._call(functools.partial(server.unregister, self.name, linger_s), timeout=linger_s)
        except Exception as e:  # the DHT may be gone already (it shut down first)
            logger.debug("removing the exchange handler: %s", e)

    def post(self, key: bytes, post: Post) -> None:
        """Serve ``post`` under ``key`` (this member's commitment for the round) from now on."""
        data, lengths = pack(post.tensors)
        call = functools.partial(
            server.add_post, self.name, key, sorted(post.peers), post.metadata, data, lengths
        )
        self._call(call, timeout=10.0)

    def fetch(self, wanted: Mapping[PeerID, bytes], timeout: float) -> dict[PeerID, Received | str]:
        """Each wanted peer's post under its key (its commitment), or a one-line reason why not."""
        if not wanted:
            return {}
        asked = {p.to_base58(): key for p, key in wanted.items()}
        call = functools.partial(server.fetch_all, self.name, asked, timeout, self.max_bytes)
        got = self._call(call, timeout=timeout)
        by_name = {p.to_base58(): p for p in wanted}
        out: dict[PeerID, Received | str] = {}
        for name, answer in got.items():
            if isinstance(answer, str):
                out[by_name[name]] = answer
                continue
            metadata, data, lengths = answer
            out[by_name[name]] = Received(metadata, unpack(data, lengths))
        return out

    def _call(self, coroutine: Any, timeout: float) -> Any:
        """Run ``coroutine(dht, node)`` in the DHT's process, waiting at most ``timeout`` + slack."""
        future = self.dht.run_coroutine(coroutine, return_future=True)
        return future.result(timeout=timeout + CALL_SLACK_S)
