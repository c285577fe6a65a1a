"""The members of a round hand each other their round data directly, over the DHT's libp2p daemon.

hivemind's butterfly all-reduce never shows a member another's delta, so neither a robust aggregate
nor a check made after the round (the nonce reveal of :mod:`cogen.node.wire`) can go through it.
:class:`RoundExchange` composes hivemind's public P2P API instead: ``P2P.replicate`` (what
``DHT.replicate_p2p()`` does, but owned by the exchange, which closes it on ``stop``; the daemon's
address comes from ``DHT.run_coroutine``) gives a client of the DHT's own daemon (no second daemon,
the same peer id), on which it registers one
streaming protobuf handler (``P2P.add_protobuf_handler``, named by
:func:`cogen.protocols.keys.exchange_name`) and calls the other members' with
``P2P.iterate_protobuf_handler``.

What a member serves for a round is a *post* (:meth:`RoundExchange.post`): small metadata (msgpack,
never pickle) and optionally serialized tensors (hivemind's ``serialize_torch_tensor``, 64 KiB
chunks), kept under the member's round commitment and given only to the peers of that round
(libp2p authenticates the caller's peer id). A request that comes before the post waits for it, up
to a deadline. :meth:`RoundExchange.fetch` asks every given peer at once, bounded in bytes per peer
(``max_bytes``) and in time, and returns what each sent, or why not: deciding what to do with a
missing or oversized answer is the caller's job. The handler runs on one event loop per process, in a
daemon thread (``start`` / ``stop`` / ``is_running``: registers and removes the handler).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming

logger = logging.getLogger(__name__)

MAX_METADATA = 64 * 1024  # bytes of a post's metadata, at most
POSTS_KEPT = 4  # rounds whose posts stay served (a slow groupmate may fetch after the next round began)


@dataclass
class Post:
    """One round's data as this member serves it."""

    peers: frozenset[str]  # who may fetch it: the round's members
    metadata: dict[str, Any]
    tensors: Sequence[runtime_pb2.Tensor] = ()
    served: set[str] = field(default_factory=set)  # who fetched it whole


@dataclass
class Received:
    """What one peer served: its metadata (unparsed, from a peer) and its serialized tensors."""

    metadata: Any
    tensors: list[runtime_pb2.Tensor] = field(default_factory=list)


class RoundExchange:
    """Serves this member's round posts and fetches the other members'."""

    def __init__(self, dht: DHT, name: str, max_bytes: int, wait_s: float = 30.0):
        self.dht, self.name, self.max_bytes, self.wait_s = dht, name, max_bytes, wait_s
        self._posts: OrderedDict[bytes, Post] = OrderedDict()
        self._changed: asyncio.Condition | None = None
        self._p2p: Any = None
        self._running = False

    def start(self) -> None:
        self._call(self._start(), timeout=60.0)
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
            if linger_s > 0:
                self._call(self._linger(linger_s), timeout=linger_s + 10.0)
            self._call(self._stop(), timeout=10.0)
        except Exception as e:  # the daemon may be gone already (the DHT shut down first)
            logger.debug("removing the exchange handler: %s", e)

    def _call(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, _loop()).result(timeout=timeout)

    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        loop = asyncio.get_running_loop()  # the call blocks on the DHT's process: not on this loop
        maddr = await loop.run_in_executor(None, self.dht.run_coroutine, _daemon_maddr)
        self._p2p = await P2P.replicate(maddr)
        await self._p2p.add_protobuf_handler(
            self.name, self._serve, averaging_pb2.AveragingData, stream_output=True
        )

    async def _linger(self, linger_s: float) -> None:
        assert self._changed is not None
        me = str(self.dht.peer_id)
        latest = next(reversed(self._posts), b"")[:-1]  # the commitment of the latest round (its suffix cut)

        def served() -> bool:
            return all(p.served >= p.peers - {me} for k, p in self._posts.items() if k[:-1] == latest)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(served), linger_s)
            except TimeoutError:
                logger.debug("stopping with groupmates that did not fetch the last round's data")

    async def _stop(self) -> None:
        try:
            await self._p2p.remove_protobuf_handler(self.name, stream_output=True)
        finally:
            await self._p2p.shutdown()  # a replica: closes its connections, leaves the daemon to the DHT

    # ---- serving -----------------------------------------------------------------------------------

    def post(self, key: bytes, post: Post) -> None:
        """Serve ``post`` under ``key`` (this member's commitment for the round) from now on."""
        self._call(self._add(key, post), timeout=10.0)

    async def _add(self, key: bytes, post: Post) -> None:
        assert self._changed is not None
        async with self._changed:
            self._posts[key] = post
            while len(self._posts) > POSTS_KEPT:
                self._posts.popitem(last=False)
            self._changed.notify_all()

    async def _serve(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        assert self._changed is not None
        key, caller = bytes(request.group_id), str(context.remote_id)
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: key in self._posts), self.wait_s)
                post = self._posts[key]
        except TimeoutError:
            return  # no such round here (or not yet): the caller sees an empty answer
        if caller not in post.peers:
            logger.debug("refusing round data to %s: not a member of that round", caller)
            return
        yield averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps(post.metadata))
        for tensor in post.tensors:
            for part in split_for_streaming(tensor):
                yield averaging_pb2.DownloadData(tensor_part=part)
        async with self._changed:
            post.served.add(caller)
            self._changed.notify_all()

    # ---- fetching ----------------------------------------------------------------------------------

    def fetch(self, wanted: Mapping[PeerID, bytes], timeout: float) -> dict[PeerID, Received | str]:
        """Each wanted peer's post under its key (its commitment), or a one-line reason why not."""
        if not wanted:
            return {}
        return dict(self._call(self._fetch_all(wanted, timeout), timeout=timeout + 10.0))

    async def _fetch_all(
        self, wanted: Mapping[PeerID, bytes], timeout: float
    ) -> list[tuple[PeerID, Received | str]]:
        async def one(peer: PeerID, key: bytes) -> tuple[PeerID, Received | str]:
            try:
                return peer, await asyncio.wait_for(self._fetch(peer, key), timeout)
            except TimeoutError:
                return peer, "did not answer in time"
            except Exception as e:  # a peer that went away, or broke the stream
                return peer, f"failed: {type(e).__name__}"

        return list(await asyncio.gather(*(one(p, k) for p, k in wanted.items())))

    async def _fetch(self, peer: PeerID, key: bytes) -> Received | str:
        request = averaging_pb2.AveragingData(group_id=key)
        stream = await self._p2p.iterate_protobuf_handler(
            peer, self.name, request, averaging_pb2.DownloadData
        )
        received: Received | None = None
        parts: list[runtime_pb2.Tensor] = []
        size = 0
        async for message in stream:
            size += message.ByteSize()
            if size > self.max_bytes:
                return f"sent over {self.max_bytes} bytes"
            if received is None:
                if not message.metadata or len(message.metadata) > MAX_METADATA:
                    return "sent no valid metadata"
                received = Received(MSGPackSerializer.loads(message.metadata))
                continue
            if message.tensor_part.dtype and parts:  # a new tensor begins: the previous one is whole
                received.tensors.append(_combined(parts))
                parts = []
            parts.append(message.tensor_part)
        if received is None:
            return "has nothing for this round"
        if parts:
            received.tensors.append(_combined(parts))
        return received


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for round exchanges, in a daemon thread (one thread for all)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="round-exchange", daemon=True).start()
            atexit.register(_close_loop, _LOOP)
        return _LOOP


async def _daemon_maddr(_dht: DHT, node: Any) -> Any:
    """Runs in the DHT's process (``DHT.run_coroutine``): where its p2p daemon listens for clients."""
    return node.p2p.daemon_listen_maddr


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """At exit: cancel what still runs on the loop (the P2P replicas' readers), then stop it."""

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=5.0)
    loop.call_soon_threadsafe(loop.stop)


def _combined(parts: list[runtime_pb2.Tensor]) -> runtime_pb2.Tensor:
    from hivemind.utils.streaming import combine_from_streaming

    return combine_from_streaming(parts)
