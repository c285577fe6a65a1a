"""The round exchange's side in the DHT's process: each function here runs there (``DHT.run_coroutine``).

:mod:`cogen.node.exchange` is the node's handle; this module keeps, per exchange name, the posts
this member serves (:class:`Server`, the last :data:`POSTS_KEPT` rounds), serves them to the round's
members only, and fetches other members' posts, bounded in bytes and time. What crosses to the node's
process is plain data: metadata as a peer sent it (msgpack-decoded, never unpickled) and the serialized
tensors packed into one byte tensor (:func:`pack`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

logger = logging.getLogger(__name__)

MAX_METADATA = 64 * 1024  # bytes of a post's metadata, at most
POSTS_KEPT = 4  # rounds whose posts stay served (a slow groupmate may fetch after the next round began)
Answer = tuple[Any, torch.Tensor, list[int]] | str  # (metadata, packed tensors, lengths) or why not


@dataclass
class Served:
    """One post as the DHT's process serves it."""

    peers: frozenset[str]
    metadata: bytes  # msgpack
    tensors: list[runtime_pb2.Tensor]
    served: set[str] = field(default_factory=set)  # who fetched it whole


class Server:
    """The posts of one exchange name, and who fetched them."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.posts: OrderedDict[bytes, Served] = OrderedDict()
        self.changed = asyncio.Condition()

    async def serve(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        key, caller = bytes(request.group_id), context.remote_id.to_base58()
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(lambda: key in self.posts), self.wait_s)
                post = self.posts[key]
        except TimeoutError:
            return  # no such round here (or not yet): the caller sees an empty answer
        if caller not in post.peers:
            logger.debug("refusing round data to %s: not a member of that round", caller)
            return
        yield averaging_pb2.DownloadData(metadata=post.metadata)
        for tensor in post.tensors:
            for part in split_for_streaming(tensor):
                yield averaging_pb2.DownloadData(tensor_part=part)
        async with self.changed:
            post.served.add(caller)
            self.changed.notify_all()


def pack(tensors: Sequence[runtime_pb2.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Serialized tensors as one byte tensor and each one's length (the inverse is :func:`unpack`)."""
    blobs = [t.SerializeToString() for t in tensors]
    joined = b"".join(blobs)
    data = (
        torch.frombuffer(bytearray(joined), dtype=torch.uint8)
        if joined
        else torch.empty(0, dtype=torch.uint8)
    )
    return data, [len(b) for b in blobs]


def unpack(data: torch.Tensor, lengths: Sequence[int]) -> list[runtime_pb2.Tensor]:
    """The serialized tensors :func:`pack` joined (lengths that do not add up are refused)."""
    raw = data.numpy().tobytes()
    if sum(lengths) != len(raw) or any(n < 0 for n in lengths):
        raise ValueError("packed tensors and their lengths disagree")
    out, offset = [], 0
    for n in lengths:
        out.append(runtime_pb2.Tensor.FromString(raw[offset : offset + n]))
        offset += n
    return out


_SERVERS: dict[str, Server] = {}


async def register(name: str, wait_s: float, _dht: Any, node: Any) -> None:
    """Start serving posts under ``name`` (a handler of that name left by an earlier exchange goes)."""
    # This process was forked: if its parent had run an OpenMP parallel region, entering one here never
    # returns (its worker threads did not survive the fork). Moving a served tensor into shared memory
    # is a copy torch would parallelize, so this process copies on its own thread.
    torch.set_num_threads(1)
    if name in _SERVERS:
        await _remove_handler(node, name)
    server = Server(wait_s)
    await node.p2p.add_protobuf_handler(name, server.serve, averaging_pb2.AveragingData, stream_output=True)
    _SERVERS[name] = server


async def unregister(name: str, linger_s: float, _dht: Any, node: Any) -> None:
    """Stop serving ``name``, first waiting up to ``linger_s`` until the latest round's posts were fetched."""
    server = _SERVERS.get(name)
    if server is None:
        return
    if linger_s > 0 and server.posts:
        latest = next(reversed(server.posts))[:-1]  # the commitment of the latest round (its suffix cut)
        me = node.peer_id.to_base58()

        def served() -> bool:
            return all(p.served >= p.peers - {me} for k, p in server.posts.items() if k[:-1] == latest)

        async with server.changed:
            try:
                await asyncio.wait_for(server.changed.wait_for(served), linger_s)
            except TimeoutError:
                logger.debug("stopping with groupmates that did not fetch the last round's data")
    if _SERVERS.get(name) is server:
        del _SERVERS[name]
        await _remove_handler(node, name)


async def _remove_handler(node: Any, name: str) -> None:
    try:
        await node.p2p.remove_protobuf_handler(name, stream_output=True)
    except Exception as e:  # the daemon may be shutting down
        logger.debug("removing exchange handler %s: %s", name, e)


async def add_post(name: str, key: bytes, peers: Sequence[str], metadata: dict[str, Any], data: torch.Tensor,
                   lengths: list[int], _dht: Any, _node: Any) -> None:  # fmt: skip
    """Serve a post under ``key`` from now on (the oldest beyond :data:`POSTS_KEPT` is dropped)."""
    server = _SERVERS.get(name)
    if server is None:
        raise RuntimeError(f"the round exchange {name} is not running")
    encoded = MSGPackSerializer.dumps(metadata)
    if len(encoded) > MAX_METADATA:
        raise ValueError(f"a post's metadata is {len(encoded)} bytes, over {MAX_METADATA}")
    async with server.changed:
        server.posts[key] = Served(frozenset(peers), encoded, unpack(data, lengths))
        while len(server.posts) > POSTS_KEPT:
            server.posts.popitem(last=False)
        server.changed.notify_all()


async def fetch_all(name: str, wanted: Mapping[str, bytes], timeout: float, max_bytes: int, _dht: Any,
                    node: Any) -> dict[str, Answer]:  # fmt: skip
    """Each wanted peer's post under its key, asked of all at once, or a one-line reason why not."""

    async def one(peer: str, key: bytes) -> tuple[str, Answer]:
        try:
            return peer, await asyncio.wait_for(_fetch(node, name, peer, key, max_bytes), timeout)
        except TimeoutError:
            return peer, "did not answer in time"
        except Exception as e:  # a peer that went away, or broke the stream
            return peer, f"failed: {type(e).__name__}"

    return dict(await asyncio.gather(*(one(p, k) for p, k in wanted.items())))


async def _fetch(node: Any, name: str, peer: str, key: bytes, max_bytes: int) -> Answer:
    request = averaging_pb2.AveragingData(group_id=key)
    stream = await node.p2p.iterate_protobuf_handler(
        PeerID.from_base58(peer), name, request, averaging_pb2.DownloadData
    )
    metadata: Any = None
    got_metadata = False
    tensors: list[runtime_pb2.Tensor] = []
    parts: list[runtime_pb2.Tensor] = []
    size = 0
    async for message in stream:
        size += message.ByteSize()
        if size > max_bytes:
            return f"sent over {max_bytes} bytes"
        if not got_metadata:
            if not message.metadata or len(message.metadata) > MAX_METADATA:
                return "sent no valid metadata"
            metadata, got_metadata = MSGPackSerializer.loads(message.metadata), True
            continue
        if message.tensor_part.dtype and parts:  # a new tensor begins: the previous one is whole
            tensors.append(combine_from_streaming(parts))
            parts = []
        parts.append(message.tensor_part)
    if not got_metadata:
        return "has nothing for this round"
    if parts:
        tensors.append(combine_from_streaming(parts))
    data, lengths = pack(tensors)
    return metadata, data, lengths
