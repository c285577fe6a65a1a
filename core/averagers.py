"""cogen's hivemind averagers: they admit only members in a permissioned swarm, and share group state.

hivemind's averaging RPCs (``rpc_join_group``, ``rpc_aggregate_part``, ``rpc_download_state``) carry
no access token, only the caller's libp2p peer id, which libp2p's handshake authenticates. A
:class:`MemberAverager` asks its DHT's :class:`cogen.core.authorizer.SwarmAuthorizer` whether that
peer id belongs to a member before it hands the request to hivemind (the overrides delegate to
``DecentralizedAverager``'s own handlers; nothing of hivemind's is copied). A refused join is answered
``PROTOCOL_VIOLATION``, a refused download is an empty stream (the caller tries the next peer). In an
open swarm (no authorizer) the averager is hivemind's exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind reads typing's alias to find streaming RPCs

import hivemind
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from cogen.core.authorizer import SwarmAuthorizer, authorizer_for


class MemberAverager(hivemind.DecentralizedAverager):
    """A ``DecentralizedAverager`` that serves only members (``authorizer``: default, the one its DHT
    was started with by :class:`cogen.core.swarm.SwarmClient`; None there: an open swarm)."""

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: hivemind.DHT,
        *args: Any,
        authorizer: SwarmAuthorizer | None = None,
        **kwargs: Any,
    ):
        self._authorizer = authorizer or authorizer_for(dht)  # set before hivemind forks the process
        super().__init__(averaged_tensors, dht, *args, **kwargs)

    async def _admits(self, context: P2PContext, action: str) -> bool:
        if self._authorizer is None:
            return True

        def get(key: str) -> Any:
            return self.dht.get(key, latest=True, return_future=True)

        return await self._authorizer.admits_peer(str(context.remote_id), get, action)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context, "request to join an averaging round"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admits(context, "part for all-reduce"):
            await anext(stream, None)  # read the first part, as hivemind does before refusing a part
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_aggregate_part(stream, context):
            yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context, "state download"):
            return
        async for response in super().rpc_download_state(request, context):
            yield response


class GroupStateAverager(MemberAverager):
    """An expert group's state averager: averages the members' anchors + outer momenta exactly, and
    shares them, with ``metadata()``, with whoever loads the state: a joining node, or the coordinator
    collecting the expert at the end of a generation.

    Node and coordinator both use this class because hivemind names the state-download RPC after the
    averager's class: a peer can only load state from an averager of the same class name."""

    def __init__(self, *args: Any, metadata: Callable[[], dict[str, Any]] | None = None, **kwargs: Any):
        self._metadata = metadata or dict
        super().__init__(*args, **kwargs)

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Any]:
        # hivemind's documented override point: what a peer loading the state downloads
        with self.get_tensors() as tensors:
            return self._metadata(), [t.clone() for t in tensors], self.tensor_infos
